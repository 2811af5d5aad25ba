"""Self-contained teacher archives: TorchScript (``torch.jit.save``) and ``torch.export`` (``.pt2``).

Both carry their own architecture and refuse ``--arch``. An exported program runs in the mode it was
exported in (its GraphModule refuses ``.eval()``), so ops traced in training mode are warned about; an
archive with a part whose loading runs code is refused unless trusted (see ``export_archive.py``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.export.passes import move_to_device_pass

from ..errors import CheckpointError, UntrustedCheckpointError
from .common import Loaded, LoadRequest, refuse_arch

logger = logging.getLogger(__name__)


def load_torchscript(file: Path, request: LoadRequest) -> Loaded:
    """The ``torchscript`` source."""
    refuse_arch(request.shown, "torchscript", request.arch, request.kwargs)
    module = _load_torchscript(file, request.shown, request.device)
    return Loaded(module, "torchscript", "torchscript", "layout=torchscript, keys used as saved")


def load_export(file: Path, request: LoadRequest) -> Loaded:
    """The ``export`` source."""
    refuse_arch(request.shown, "export", request.arch, request.kwargs)
    module = _load_export(file, request.shown, request.device, request.trust)
    return Loaded(module, "export", "export", "layout=export, keys used as saved")


def _load_torchscript(file: Path, shown: str, device: torch.device) -> nn.Module:
    """``torch.jit.load`` straight onto the device (TorchScript code, no Python unpickling).

    torch 2.13 deprecates TorchScript; the user chose the format, so its DeprecationWarning (which
    names ``torch.jit.load``, not anything the user can change) is not repeated to them.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.load.*")
            return torch.jit.load(str(file), map_location=device)
    except Exception as exc:
        raise CheckpointError(f"cannot load TorchScript archive {shown!r}: {exc}") from exc


def _load_export(file: Path, shown: str, device: torch.device, trust: bool) -> nn.Module:
    """``torch.export.load`` then ``.module()``; the device move rewrites the graph's device constants too.

    Unless ``trust``, the archive is first inspected (:func:`export_archive.unsafe_parts`) and refused if any
    part of it would run code. torch then reads the same open file, so the archive checked is the one loaded.
    An untrusted program's module is built with ``check_guards=False``: its ``guards_code`` is empty (checked),
    and torch would otherwise paste the graph's input names and values into Python source that it runs; the
    module's forward pre-hook still checks the inputs against the program's shape constraints.
    """
    try:
        handle = open(file, "rb")  # noqa: SIM115 - closed by the with below; opened apart so OSError is named
    except OSError as exc:
        raise CheckpointError(f"cannot read torch.export archive {shown!r}: {exc}") from exc
    with handle:
        if not trust:
            # imported here: the inspector needs torch._export, whose import (torch._dynamo) is ~40% of a CLI start
            from .export_archive import describe, unsafe_parts

            try:
                problems = unsafe_parts(handle)
            except ValueError as exc:  # torch would fall back to its legacy loader, which unpickles
                raise CheckpointError(f"cannot load torch.export archive {shown!r}: {exc}") from exc
            if problems:
                raise UntrustedCheckpointError(
                    f"teacher checkpoint {shown!r} is a torch.export archive with parts whose loading runs code from "
                    f"the file: {describe(problems)}. If you trust the file, pass --trust-checkpoint; otherwise "
                    f"re-export it with torch.export.save from a plain nn.Module in eval mode, or save its weights with "
                    f"torch.save(model.state_dict()) and load them with --arch"
                )
        try:
            handle.seek(0)
            program = torch.export.load(handle)
            program = move_to_device_pass(program, device)
            module = program.module() if trust else program.module(check_guards=False)
        except Exception as exc:
            raise CheckpointError(f"cannot load torch.export archive {shown!r}: {exc}") from exc
    _warn_training_ops(module, shown)
    return module


def _warn_training_ops(module: nn.Module, shown: str) -> None:
    """Warn about ops traced in training mode: an exported graph keeps them, and ``.eval()`` cannot undo it.

    A dropout with ``train=True`` makes the cached logits random; a batch norm with ``training=True``
    makes them depend on the batch. Found by the op schema's ``train``/``training`` argument.
    """
    graph = getattr(module, "graph", None)
    found: set[str] = set()
    for node in getattr(graph, "nodes", ()):
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None:
            continue
        for position, argument in enumerate(schema.arguments):
            if argument.name in ("train", "training"):
                value = node.args[position] if position < len(node.args) else node.kwargs.get(argument.name)
                if value is True:
                    found.add(str(node.target))
    if found:
        logger.warning(
            "torch.export archive %s was exported in training mode (%s run with train=True) and cannot be "
            "switched to eval mode; its logits will be random or batch-dependent. Re-export after model.eval().",
            shown,
            ", ".join(sorted(found)),
        )
