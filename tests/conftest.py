"""Shared fixtures: a small seeded teacher checkpoint and a CliRunner wrapper."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from logit_cache.cli import main
from logit_cache.models import digits_mlp

ARCH = "logit_cache.models:digits_mlp"
ARCH_KWARGS = '{"hidden": 32}'


def make_teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return digits_mlp(hidden=32).eval()


@pytest.fixture
def teacher_module() -> torch.nn.Module:
    return make_teacher()


@pytest.fixture
def teacher_ckpt(tmp_path: Path, teacher_module: torch.nn.Module) -> Path:
    path = tmp_path / "teacher.pt"
    torch.save(teacher_module.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded teacher's state_dict, saved once per module (for subprocess tests)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(make_teacher().state_dict(), path)
    return path


def run_cli(*args: str) -> Result:
    """Run ``logit-cache ARGS`` in-process, as a user would type it."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def cli():
    return run_cli
