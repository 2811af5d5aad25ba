"""Helpers of the multi-process tests (torchrun, Lightning's ranks): a free port, a bounded wait."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

#: Seconds a multi-process run may take before the test fails instead of blocking (a rank hangs in a collective).
TIMEOUT = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_argv(*args: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` with ``nproc`` ranks on loopback, on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", *args]


def finish(proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> tuple[int, str, str]:
    """Wait (at most ``timeout``: a hang in a collective fails the test instead of blocking it)."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"no exit within {timeout} s (a rank hangs?):\n{stdout}\n{stderr}")
    return proc.returncode, stdout, stderr
