"""Load a teacher from a checkpoint of any supported kind, in eval mode, with its fingerprint.

A teacher reaches us in one of five shapes, told apart without unpickling anything:

* **state_dict** -- a ``torch.save`` of tensors (possibly nested in a training checkpoint: ``{"model": sd}``,
  ``{"model_state_dict": sd}``, PyTorch Lightning's ``{"state_dict": sd, "epoch": ...}``, Composer's
  ``{"state": {"model": sd}}``). Weights only: it is read with ``weights_only=True`` and needs ``--arch``
  (a ``module:callable`` that builds the model) to become a module. Key prefixes left by wrappers
  (``module.`` from DDP/Composer, ``model.`` from Lightning, ``_orig_mod.`` from ``torch.compile``) are
  stripped only when stripping is what makes the keys match the model built by ``--arch``.
* **torchscript** -- a ``torch.jit.save`` archive; it carries its own architecture (TorchScript code).
* **export** -- a ``torch.export.save`` ``.pt2`` archive; it carries its own graph. An exported program
  runs in the mode it was exported in: its GraphModule refuses ``.eval()``, and a dropout or batch-norm
  traced in training mode stays in training mode (we warn when the graph holds such ops). Loading one can
  run code from the file (pickled weights, constants or sample inputs; AOTInductor libraries; Python source
  in the program's JSON: see ``export_archive.py``), so each archive is inspected before torch reads it and
  one with such a part is refused unless the caller passes ``trust_checkpoint=True``. Archives that
  ``torch.export.save`` writes for a plain module hold none and load without it.
* **pickle** -- a ``torch.save(model)`` of a whole ``nn.Module``. Unpickling it runs arbitrary code, so it
  is refused unless the caller passes ``trust_checkpoint=True`` (``--trust-checkpoint``).
* **hf** -- ``hf:DIR``, a local Hugging Face ``transformers`` model directory written by ``save_pretrained``
  (``config.json`` plus safetensors weights). Its config names the architecture; only causal language models
  are supported, loaded with ``AutoModelForCausalLM`` from local files only (nothing is downloaded, no code
  from the directory is run). Needs the ``hf`` extra (``pip install 'logit-cache[hf]'``).

The teacher's identity in a cache is the SHA-256 of the checkpoint file (see ``format/identity.py``), or of
the whole model directory for ``hf:`` teachers (:func:`teacher_sha256`), plus the ``--arch`` spec and kwargs for
state dicts, whose architecture lives outside the file.

This module holds the :class:`Teacher`, format detection, the identity and the registry of sources
(:data:`SOURCES`: format name -> loader) that :func:`load_teacher` dispatches on; each source is a module:
``checkpoints.py`` (``torch.save`` state dicts and pickled modules), ``exported.py`` (TorchScript and
``torch.export``), ``hf.py`` (``hf:DIR``). Another source is a loader passed to :func:`register_source`.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, CheckpointNotFoundError, UsageError
from ..format.identity import file_sha256
from .checkpoints import load_torch
from .common import Loaded, LoadRequest, check_arch_kwargs
from .exported import load_export, load_torchscript
from .hf import HF_PREFIX, hf_dir, hf_sha256, is_hf_spec, load_hf
from .placement import Placement, parse_device_map, parse_max_memory
from .runtime import weights_dtype

__all__ = [
    "HF_PREFIX",
    "SOURCES",
    "Teacher",
    "detect_format",
    "hf_dir",  # moved to teachers/hf.py
    "is_hf_spec",  # moved to teachers/hf.py
    "load_teacher",
    "register_source",
    "teacher_sha256",
]

logger = logging.getLogger(__name__)

#: A teacher source: loads what a spec names (a Path for files, the ``hf:DIR`` string) for a request.
Loader = Callable[[Any, LoadRequest], Loaded]

#: The teacher sources by format name: what :func:`detect_format` returns, and ``hf`` for ``hf:DIR``.
SOURCES: dict[str, Loader] = {}


def register_source(name: str, loader: Loader) -> Loader:
    """Add (or replace) the loader for format ``name``; returns it."""
    SOURCES[name] = loader
    return loader


for _name, _loader in (("torch", load_torch), ("torchscript", load_torchscript), ("export", load_export), ("hf", load_hf)):
    register_source(_name, _loader)


@dataclass(frozen=True)
class Teacher:
    """A loaded teacher and what a cache manifest records about where it came from.

    ``module`` is ready to call: eval mode (where the format allows), parameters frozen, on the device.
    ``layout`` says where a state dict's weights were found (``plain``, ``model``, ``model_state_dict``,
    ``state_dict`` or ``composer``); for the self-contained formats it equals ``format``.
    ``input_device`` is where its inputs go (for a teacher split by a device map: the device of its input
    embeddings, where its logits come back too); ``device_map`` says where each part of it was placed.
    """

    module: Callable[..., Any]
    path: str
    sha256: str
    format: str
    layout: str
    arch: str | None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    input_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    device_map: dict[str, str] | None = None

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's ``teacher`` object: plain JSON types only, a copy the caller may keep."""
        return {
            "path": self.path,
            "sha256": self.sha256,
            "format": self.format,
            "layout": self.layout,
            "arch": self.arch,
            "arch_kwargs": json.loads(json.dumps(self.arch_kwargs)),
        }


def detect_format(path: str | Path) -> str:
    """Tell a checkpoint's kind from its zip member names, without unpickling anything.

    Returns ``"torchscript"``, ``"export"`` or ``"torch"`` (a ``torch.save`` file: a state dict or a pickled
    module, told apart only by loading). All three are zip archives with one root folder; TorchScript
    archives hold ``<root>/constants.pkl`` and ``<root>/code/...``, ``torch.export`` archives hold
    ``<root>/archive_format`` and ``<root>/models/*.json``. A file that is not a zip is taken for a legacy
    (pre-1.6) ``torch.save`` file; whether it really is one shows when it is loaded.

    Raises CheckpointError for a zip archive that is none of these, or an unreadable file.
    """
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            return "torch"
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    # Member names are "<root>/<member>"; the root folder's name is arbitrary (torch uses the file stem).
    members = {name.partition("/")[2] for name in names}
    if "constants.pkl" in members and any(m.startswith("code/") for m in members):
        return "torchscript"
    if "archive_format" in members or any(m.startswith("models/") and m.endswith(".json") for m in members):
        return "export"
    if "data.pkl" in members:
        return "torch"
    raise CheckpointError(
        f"checkpoint {str(path)!r} is a zip archive but not a PyTorch checkpoint (no data.pkl, TorchScript "
        f"code or torch.export program in it); pass a file written by torch.save, torch.jit.save or "
        f"torch.export.save"
    )


def teacher_sha256(spec: str | Path) -> str:
    """The teacher's identity in a cache: SHA-256 hex digest (lowercase, as :func:`file_sha256` gives).

    For a checkpoint file it is :func:`file_sha256` of the path (a directory passed without ``hf:`` hashes as
    below; :func:`load_teacher` refuses one, so no cache is made from it). For
    ``"hf:DIR"`` it is one digest over the whole model directory, not only the weights: ``config.json`` shapes
    the model as much as the weights do (a changed ``rope_theta``, ``layer_norm_eps``, activation or attention
    setting gives other logits from the same tensors), and a sharded model spreads its weights over several
    files. Definition (:func:`~logit_cache.format.identity.directory_sha256`):
    for each regular file under DIR (recursive, symlinks followed, skipping every path
    with a component that starts with ``.`` or is ``__pycache__``), in the order of the sorted POSIX paths
    relative to DIR, feed ``relative_path + "\\0" + str(size_in_bytes) + "\\0"`` (UTF-8), then the file's bytes.
    The size makes the boundary between one file's bytes and the next path unambiguous; hidden entries are
    skipped because tools keep caches there (``.cache/huggingface`` from ``hf download --local-dir``, ``.git``).

    Raises CheckpointNotFoundError for a missing file or directory, CheckpointError when ``hf:`` names a file.
    """
    if is_hf_spec(spec):
        return hf_sha256(str(spec))
    path = Path(spec)
    if not path.exists():
        raise CheckpointNotFoundError(f"teacher checkpoint {str(spec)!r} does not exist; check the path")
    return file_sha256(path)


def load_teacher(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_checkpoint: bool = False,
    device: str | torch.device = "cpu",
    sha256: str | None = None,
    precision: str | torch.dtype = "fp32",
    device_map: str | dict[str, Any] | Placement | None = None,
    max_memory: str | dict[Any, Any] | None = None,
) -> Teacher:
    """Load a teacher checkpoint of any supported kind, ready for inference.

    ``sha256`` is the file's hash when the caller already computed it (the dump hashes the file
    before loading, for the cache key); hashing a multi-GB teacher twice costs seconds.

    ``precision`` (``fp32``, ``bf16``, ``fp16`` or a torch dtype) is the dtype the weights are loaded and
    held in: ``hf:`` directories and state dicts are read straight into it (no float32 copy of the model);
    TorchScript, ``torch.export`` and pickled modules are built by their own code, so they are cast after
    loading. ``device_map`` (``auto``, ``balanced``, ``sequential``, a ``{"module": device}`` dict or JSON,
    or a :class:`~logit_cache.teachers.placement.Placement`) with ``max_memory`` spreads an ``hf:``
    teacher over GPUs, CPU and disk (needs accelerate); ``device`` is then unused and
    ``Teacher.input_device`` says where inputs go.

    ``path`` may also be ``"hf:DIR"``, a local Hugging Face causal LM directory (see
    :func:`~logit_cache.teachers.hf.load_hf`); it refuses ``arch`` and needs no ``trust_checkpoint``
    (its weights are read without unpickling code).

    A state dict needs ``arch`` (``"module:callable"``, called with ``arch_kwargs``) and is loaded with
    ``strict=True``: a teacher with a missing or misshapen weight would silently produce wrong logits for
    the whole cache. TorchScript and ``torch.export`` archives carry their own architecture and refuse
    ``arch``. A pickled ``nn.Module``, and a ``torch.export`` archive with a part whose loading runs code (a
    pickle, compiled code, Python source), need ``trust_checkpoint=True``.

    Example::

        teacher = load_teacher("ckpt.pt", arch="logit_cache.models:digits_mlp", arch_kwargs={"hidden": 16})
        logits = teacher.module(images)  # (B, 10)
    """
    shown = str(path)
    dtype = weights_dtype(precision)
    placement = _placement(shown, device_map, max_memory)
    request = LoadRequest(shown, arch, check_arch_kwargs(arch_kwargs), torch.device(device), trust_checkpoint, dtype, placement)
    if placement is not None and not is_hf_spec(path):
        raise UsageError(f"--device-map places hf:DIR teachers (through transformers and accelerate); teacher {shown!r} is a "
                         f"checkpoint file: drop --device-map (and --max-memory), or save the model with save_pretrained")
    if is_hf_spec(path):
        source, target = "hf", shown
    else:
        target = Path(path)
        if not target.exists():
            raise CheckpointNotFoundError(f"teacher checkpoint {shown!r} does not exist; check the path")
        if target.is_dir():
            raise CheckpointError(
                f"teacher checkpoint {shown!r} is a directory; pass the checkpoint file inside it "
                f"(written by torch.save, torch.jit.save or torch.export.save)"
            )
        source = detect_format(target)
    loaded = SOURCES[source](target, request)
    digest = sha256 or teacher_sha256(path)
    placed = placement is not None or loaded.input_device is not None
    module = _prepare(loaded.module, None if placed else request.device, None if loaded.in_dtype else dtype)
    where = loaded.input_device or request.device
    logger.info("loaded teacher %s: format=%s %s on %s in %s", shown, loaded.format, loaded.detail, where, dtype)
    return Teacher(
        module=module,
        path=shown,
        sha256=digest,
        format=loaded.format,
        layout=loaded.layout,
        arch=arch if loaded.uses_arch else None,
        arch_kwargs=dict(request.kwargs) if loaded.uses_arch else {},
        input_device=where,
        dtype=dtype,
        device_map=loaded.device_map,
    )


def _placement(shown: str, device_map: Any, max_memory: Any) -> Placement | None:
    """The device map asked, checked (None: the whole teacher on ``device``)."""
    if isinstance(device_map, Placement):
        if max_memory is not None:
            raise UsageError("pass max_memory inside the Placement, not beside it")
        return device_map
    if device_map is None:
        if max_memory is not None:
            raise UsageError(f"--max-memory for teacher {shown!r} budgets a --device-map; pass --device-map auto with it")
        return None
    return Placement(parse_device_map(device_map), parse_max_memory(max_memory))  # type: ignore[arg-type]


def _prepare(module: Any, device: torch.device | None, dtype: torch.dtype | None = None) -> Any:
    """Eval mode, frozen parameters, in ``dtype`` (when the loader did not load it so), on the device
    (None: a device map placed it already): a teacher only ever runs inference.

    ``requires_grad_`` is set per parameter because ScriptModules refuse the module-level call. The
    GraphModule of a torch.export program refuses ``.eval()`` (NotImplementedError in this torch): it runs
    in the mode it was exported in, which ``_warn_training_ops`` checked.
    """
    try:
        module.eval()
    except NotImplementedError:
        logger.info("teacher module %s has no eval mode; it runs in the mode it was exported in", type(module).__name__)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    if dtype is not None and dtype != torch.float32:
        module = module.to(dtype)
    return module if device is None else module.to(device)
