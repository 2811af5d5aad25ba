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

The teacher's identity in a cache is the SHA-256 of the checkpoint file (see ``fingerprint.py``), or of the
whole model directory for ``hf:`` teachers (:func:`teacher_sha256`), plus the ``--arch`` spec and kwargs for
state dicts, whose architecture lives outside the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export.passes import move_to_device_pass

from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    MissingPackageError,
    SpecError,
    StateDictMismatchError,
    UntrustedCheckpointError,
    UsageError,
)
from ..format.identity import _READ_BLOCK, file_sha256
from ..specs import resolve_callable
from .export_archive import describe, unsafe_parts

logger = logging.getLogger(__name__)

#: Wrapper prefixes that training tools put in front of a model's own keys: DDP / Composer (``module.``),
#: Lightning (``model.``, the conventional attribute name), ``torch.compile`` (``_orig_mod.``).
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
#: Where training checkpoints keep the model's weights, tried in this order (``layout`` names the place).
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
#: How many key names an error lists before it says "and N more": enough to see the pattern, still one line.
_MAX_LISTED = 8
#: Fragments of torch's weights-only error that mean "a Python object is pickled here" (as opposed to a
#: corrupt or non-pickle file, which torch reports through the same exception type).
_PICKLED_OBJECT_MARKERS = ("GLOBAL ", "unrecognized function", "Can only create new object", "Can only build")
#: The prefix of a teacher spec naming a local Hugging Face model directory: ``hf:DIR``.
HF_PREFIX = "hf:"
#: What a Hugging Face model directory holds, for error messages.
_HF_DIR_HOLDS = (
    "a Hugging Face model directory (written by model.save_pretrained(DIR)) holds config.json and the weights "
    "(model.safetensors, or model-0000N-of-0000M.safetensors shards with model.safetensors.index.json)"
)


@dataclass(frozen=True)
class Teacher:
    """A loaded teacher and what a cache manifest records about where it came from.

    ``module`` is ready to call: eval mode (where the format allows), parameters frozen, on the device.
    ``layout`` says where a state dict's weights were found (``plain``, ``model``, ``model_state_dict``,
    ``state_dict`` or ``composer``); for the self-contained formats it equals ``format``.
    """

    module: Callable[..., Any]
    path: str
    sha256: str
    format: str
    layout: str
    arch: str | None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)

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


def is_hf_spec(spec: str | Path) -> bool:
    """Whether a teacher spec names a Hugging Face model directory: a string ``"hf:DIR"`` (a Path never does)."""
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def hf_dir(spec: str) -> Path:
    """The directory of an ``"hf:DIR"`` spec (``~`` expanded); UsageError for any other spec or an empty DIR."""
    if not is_hf_spec(spec):
        raise UsageError(f"teacher spec {str(spec)!r} does not start with {HF_PREFIX!r}; expected hf:DIR")
    rest = spec[len(HF_PREFIX) :]
    if not rest:
        raise UsageError(f"teacher spec {spec!r} names no directory; pass hf:DIR, DIR written by save_pretrained")
    return Path(rest).expanduser()


def teacher_sha256(spec: str | Path) -> str:
    """The teacher's identity in a cache: SHA-256 hex digest (lowercase, as :func:`file_sha256` gives).

    For a checkpoint file (or a directory passed without ``hf:``) it is :func:`file_sha256` of the path. For
    ``"hf:DIR"`` it is one digest over the whole model directory, not only the weights: ``config.json`` shapes
    the model as much as the weights do (a changed ``rope_theta``, ``layer_norm_eps``, activation or attention
    setting gives other logits from the same tensors), and a sharded model spreads its weights over several
    files. Definition: for each regular file under DIR (recursive, symlinks followed, skipping every path
    with a component that starts with ``.`` or is ``__pycache__``), in the order of the sorted POSIX paths
    relative to DIR, feed ``relative_path + "\\0" + str(size_in_bytes) + "\\0"`` (UTF-8), then the file's bytes.
    The size makes the boundary between one file's bytes and the next path unambiguous; hidden entries are
    skipped because tools keep caches there (``.cache/huggingface`` from ``hf download --local-dir``, ``.git``).

    Raises CheckpointNotFoundError for a missing file or directory, CheckpointError when ``hf:`` names a file.
    """
    if is_hf_spec(spec):
        return _directory_sha256(hf_dir(spec), str(spec))
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
) -> Teacher:
    """Load a teacher checkpoint of any supported kind, ready for inference.

    ``sha256`` is the file's hash when the caller already computed it (the dump hashes the file
    before loading, for the cache key); hashing a multi-GB teacher twice costs seconds.

    ``path`` may also be ``"hf:DIR"``, a local Hugging Face causal LM directory (see :func:`_load_hf`); it
    refuses ``arch`` and needs no ``trust_checkpoint`` (its weights are read without unpickling code).

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
    kwargs = _check_arch_kwargs(arch_kwargs)
    if is_hf_spec(path):
        return _load_hf(shown, arch, kwargs, torch.device(device), sha256)
    file = Path(path)
    if not file.exists():
        raise CheckpointNotFoundError(f"teacher checkpoint {shown!r} does not exist; check the path")
    if file.is_dir():
        raise CheckpointError(
            f"teacher checkpoint {shown!r} is a directory; pass the checkpoint file inside it "
            f"(written by torch.save, torch.jit.save or torch.export.save)"
        )
    device = torch.device(device)
    kind = detect_format(file)
    stripped: str | None = None
    if kind in ("torchscript", "export"):
        _refuse_arch(shown, kind, arch, kwargs)
        if kind == "torchscript":
            module = _load_torchscript(file, shown, device)
        else:
            module = _load_export(file, shown, device, trust_checkpoint)
        fmt = layout = kind
    else:
        obj = _torch_load(file, shown, trust_checkpoint)
        if isinstance(obj, nn.Module):
            _refuse_arch(shown, "pickle", arch, kwargs)
            module = obj
            fmt = layout = "pickle"
        else:
            candidates = _state_dict_candidates(obj, shown)
            if arch is None:
                where = ", ".join(sorted({layout for layout, _ in candidates}))
                raise CheckpointError(
                    f"teacher checkpoint {shown!r} holds weights (a state dict, layout {where}) but no "
                    f"architecture; pass --arch MODULE:CALLABLE naming the function or class that builds the "
                    f"model (and --arch-kwargs with its arguments as JSON)"
                )
            model = _build_arch(arch, kwargs)
            model, layout, stripped = _load_best_candidate(model, candidates, shown, arch, kwargs)
            module = model
            fmt = "state_dict"
    module = _prepare(module, device)
    teacher = Teacher(
        module=module,
        path=shown,
        sha256=sha256 or file_sha256(file),
        format=fmt,
        layout=layout,
        arch=arch if fmt == "state_dict" else None,
        arch_kwargs=kwargs if fmt == "state_dict" else {},
    )
    logger.info(
        "loaded teacher %s: format=%s layout=%s%s on %s",
        shown,
        fmt,
        layout,
        f", stripped {stripped} from the keys" if stripped else ", keys used as saved",
        device,
    )
    return teacher


# --- arguments --------------------------------------------------------------------------------------


def _check_arch_kwargs(arch_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Copy ``arch_kwargs`` after checking it can be recorded in the manifest (JSON), or raise UsageError.

    What cannot be written down cannot identify a cache, so it is refused before any loading work.
    """
    if arch_kwargs is None:
        return {}
    if not isinstance(arch_kwargs, Mapping) or not all(isinstance(k, str) for k in arch_kwargs):
        raise UsageError(f"--arch-kwargs must be a JSON object with string keys, got {arch_kwargs!r}")
    try:
        return json.loads(json.dumps(dict(arch_kwargs), allow_nan=False))
    except (TypeError, ValueError) as exc:
        message = f"--arch-kwargs {arch_kwargs!r} cannot be recorded as JSON ({exc}); pass JSON values only"
        raise UsageError(message) from exc


def _refuse_arch(shown: str, fmt: str, arch: str | None, kwargs: Mapping[str, Any]) -> None:
    """Self-contained formats ignore --arch; refuse it rather than let the user think it was used."""
    if arch is None and not kwargs:
        return
    given = "--arch" if arch is not None else "--arch-kwargs"
    what = {
        "torchscript": "a TorchScript archive",
        "export": "a torch.export archive",
        "hf": "a Hugging Face model directory (its config.json names the architecture)",
    }.get(fmt, "a pickled nn.Module")
    raise UsageError(
        f"teacher checkpoint {shown!r} is {what}, which carries its own architecture; drop {given} "
        f"(it is only for state-dict checkpoints)"
    )


def _build_arch(arch: str, kwargs: Mapping[str, Any], on_meta: bool = True) -> nn.Module:
    """Resolve and call the --arch factory; a failure names the spec and kwargs (SpecError).

    With ``on_meta`` the model is first built on the ``meta`` device: no memory is allocated and no
    random initialisation runs, which the checkpoint's weights would overwrite anyway (0.2 s for a
    39M-parameter MLP, seconds for a big teacher). A factory that cannot build on ``meta`` is built
    normally; see :func:`_load_weights` for the other fallback.
    """
    factory = resolve_callable(arch, "--arch")
    if on_meta:
        try:
            with torch.device("meta"):
                model = factory(**kwargs)
            if isinstance(model, nn.Module):
                return model
        except Exception:  # some factories compute on tensors in __init__: build them for real below
            pass
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise SpecError(
            f"--arch {arch!r} with --arch-kwargs {json.dumps(kwargs)} failed to build the model: {exc!r}; "
            f"check that the kwargs match the callable's signature"
        ) from exc
    if not isinstance(model, nn.Module):
        raise SpecError(f"--arch {arch!r} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def _is_on_meta(model: nn.Module) -> bool:
    return any(tensor.is_meta for tensor in (*model.parameters(), *model.buffers()))


def _load_weights(model: nn.Module, state_dict: Any, arch: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Load ``state_dict`` strictly into ``model``; returns the loaded model.

    A model built on ``meta`` takes the checkpoint's tensors (``assign=True``), cast to the model's
    own dtypes as a normal load would. If anything is still on ``meta`` afterwards (a buffer that is
    not saved in state dicts, e.g. a cached position table), the model is rebuilt for real and
    loaded the usual way, so the result never depends on the shortcut.
    """
    if not _is_on_meta(model):
        model.load_state_dict(state_dict, strict=True)
        return model
    wanted = model.state_dict()
    cast = type(state_dict)(
        (key, value.to(wanted[key].dtype) if key in wanted and value.dtype != wanted[key].dtype else value)
        for key, value in state_dict.items()
    )
    if hasattr(state_dict, "_metadata"):
        cast._metadata = state_dict._metadata
    model.load_state_dict(cast, strict=True, assign=True)
    if not _is_on_meta(model):
        return model
    real = _build_arch(arch, kwargs, on_meta=False)
    real.load_state_dict(state_dict, strict=True)
    return real


# --- loading each format ----------------------------------------------------------------------------


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


def _torch_load(file: Path, shown: str, trust: bool) -> Any:
    """``torch.load`` weights-only; fall back to full unpickling only for a trusted file.

    torch reports a pickled Python object and a corrupt file through the same ``UnpicklingError``; the
    "GLOBAL ..." part of its message is what tells a pickled object apart.
    """
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "Weights only load failed" not in message or not any(m in message for m in _PICKLED_OBJECT_MARKERS):
            raise CheckpointError(
                f"cannot load teacher checkpoint {shown!r}: it is not a PyTorch checkpoint or it is corrupted "
                f"({_last_line(message)})"
            ) from exc
        if not trust:
            found = re.search(r"GLOBAL (\S+)", message)
            raise UntrustedCheckpointError(
                f"teacher checkpoint {shown!r} holds a pickled Python object"
                f"{f' ({found.group(1)})' if found else ''}, not only tensors; loading it runs arbitrary code "
                f"from the file. If you trust the file, pass --trust-checkpoint; otherwise save the weights "
                f"with torch.save(model.state_dict()) and load them with --arch"
            ) from exc
    except Exception as exc:
        raise CheckpointError(
            f"cannot load teacher checkpoint {shown!r}: it is not a PyTorch checkpoint or it is corrupted "
            f"({type(exc).__name__}: {_last_line(str(exc))})"
        ) from exc
    logger.warning("unpickling teacher checkpoint %s with weights_only=False (--trust-checkpoint)", shown)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:
        hint = ""
        if isinstance(exc, (AttributeError, ImportError)):
            hint = "; the classes it was pickled with must be importable under the same module names"
        raise CheckpointError(f"cannot unpickle teacher checkpoint {shown!r}: {exc!r}{hint}") from exc
    if not isinstance(obj, (nn.Module, Mapping)):
        raise CheckpointError(
            f"teacher checkpoint {shown!r} holds an object of type {type(obj).__module__}.{type(obj).__qualname__}, "
            f"expected a torch.nn.Module or a state dict"
        )
    return obj


def _last_line(message: str) -> str:
    """The informative tail of a long torch message, kept to one line for the CLI."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip() and "documentation" not in line]
    return lines[-1] if lines else message


# --- state dicts ------------------------------------------------------------------------------------


def _is_weights(value: Any) -> bool:
    """A mapping of str keys with at least one tensor value: what ``module.state_dict()`` gives."""
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) for k in value)
        and any(isinstance(v, torch.Tensor) for v in value.values())
    )


def _state_dict_candidates(obj: Any, shown: str) -> list[tuple[str, Mapping[str, Any]]]:
    """Every place in a loaded checkpoint that may hold the model's weights, as (layout, state dict).

    More than one may exist (a training checkpoint with both ``model`` and ``state_dict``); the one whose
    keys fit the architecture wins, so the order here only breaks ties.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"teacher checkpoint {shown!r} holds a {type(obj).__name__}, expected a state dict (a dict of "
            f"tensors), a training checkpoint holding one, or a pickled nn.Module"
        )
    candidates: list[tuple[str, Mapping[str, Any]]] = []
    if _is_weights(obj):
        candidates.append(("plain", obj))
    for key in _NESTED_KEYS:
        if _is_weights(obj.get(key)):
            candidates.append((key, obj[key]))
    state = obj.get("state")
    if isinstance(state, Mapping) and _is_weights(state.get("model")):
        candidates.append(("composer", state["model"]))
    if not candidates:
        keys = ", ".join(repr(k) for k in list(obj)[:_MAX_LISTED])
        raise CheckpointError(
            f"teacher checkpoint {shown!r} holds a dict (keys {keys}) with no weights at the top level or under "
            f"'state_dict', 'model_state_dict', 'model' or 'state'/'model'; save the model's state_dict()"
        )
    return candidates


def _prefix_options(keys: Iterable[str]) -> list[str]:
    """The wrapper prefixes worth trying for these keys, shortest first ("" = keep the keys as they are).

    A key such as ``module._orig_mod.0.weight`` offers ``module.`` and ``module._orig_mod.``.
    """
    options = {""}
    for key in keys:
        chain = ""
        while True:
            rest = key[len(chain) :]
            step = next((p for p in _WRAPPER_PREFIXES if rest.startswith(p)), None)
            if step is None:
                break
            chain += step
            options.add(chain)
    return sorted(options, key=lambda p: (p.count("."), p))


def _rename(key: str, prefix: str, drop_infix: bool) -> str | None:
    """Strip ``prefix`` from a key (None if it lacks it); optionally drop inner ``_orig_mod.`` segments.

    Also used on ``_metadata`` keys, which name modules (``""`` is the root, ``"module"`` the wrapper),
    hence the trailing dot that makes ``"module"`` strip to the root.
    """
    dotted = key + "."
    if not dotted.startswith(prefix):
        return None
    rest = dotted[len(prefix) :]
    if drop_infix:
        rest = rest.replace("._orig_mod.", ".")
    return rest[:-1]


def _variant(state_dict: Mapping[str, Any], prefix: str, drop_infix: bool) -> dict[str, Any] | None:
    """The state dict with ``prefix`` stripped (keys without it left out); None if renaming collides."""
    renamed: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = _rename(key, prefix, drop_infix)
        if new is not None:
            renamed[new] = value
    if len(renamed) < sum(1 for key in state_dict if (key + ".").startswith(prefix)):
        return None
    return renamed


@dataclass
class _Fit:
    """How one (layout, prefix) reading of a checkpoint fits the model's keys and shapes."""

    layout: str
    prefix: str
    drop_infix: bool
    source: Mapping[str, Any]
    state_dict: dict[str, Any]
    ignored: int
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    fitting: int

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def stripped(self) -> str | None:
        """What was stripped from the keys, for logs and errors; None when they were used as they are."""
        inner = "inner '_orig_mod.'" if self.drop_infix else ""
        if self.prefix and inner:
            return f"{self.prefix!r} and {inner}"
        return repr(self.prefix) if self.prefix else inner or None


def _fit(layout: str, prefix: str, drop_infix: bool, source: Mapping[str, Any], wanted: dict[str, Any]) -> _Fit | None:
    """Compare one reading of the checkpoint with the model's own state dict (keys, then shapes)."""
    renamed = _variant(source, prefix, drop_infix)
    if renamed is None:
        return None
    mismatched = [
        (key, tuple(renamed[key].shape), tuple(wanted[key].shape))
        for key in wanted
        if key in renamed
        and isinstance(renamed[key], torch.Tensor)
        and isinstance(wanted[key], torch.Tensor)
        and renamed[key].shape != wanted[key].shape
    ]
    missing = [key for key in wanted if key not in renamed]
    return _Fit(
        layout=layout,
        prefix=prefix,
        drop_infix=drop_infix,
        source=source,
        state_dict=renamed,
        ignored=len(source) - len(renamed),
        missing=missing,
        unexpected=[key for key in renamed if key not in wanted],
        mismatched=mismatched,
        fitting=len(wanted) - len(missing) - len(mismatched),
    )


def _load_best_candidate(
    model: nn.Module,
    candidates: list[tuple[str, Mapping[str, Any]]],
    shown: str,
    arch: str,
    kwargs: Mapping[str, Any],
) -> tuple[nn.Module, str, str | None]:
    """Load the first (layout, prefix) reading that fits the model exactly; else report the closest.

    Prefixes are stripped only when that is what makes the keys fit, so a model whose own keys start with
    ``model.`` keeps them. Returns the loaded model, the layout and the stripped prefix (None when nothing
    was stripped).
    """
    wanted = model.state_dict()
    fits: list[_Fit] = []
    for layout, source in candidates:
        infix_options = (False, True) if any("._orig_mod." in key for key in source) else (False,)
        for prefix in _prefix_options(source):
            for drop_infix in infix_options:
                fit = _fit(layout, prefix, drop_infix, source, wanted)
                if fit is not None:
                    fits.append(fit)
    exact = next((fit for fit in fits if fit.exact), None)
    if exact is None:
        # Closest = most weights that would load, then fewest extras; max() keeps the first of equals.
        closest = max(fits, key=lambda fit: (fit.fitting, -len(fit.unexpected)))
        raise StateDictMismatchError(_mismatch_message(closest, shown, arch, kwargs))
    if exact.ignored:
        logger.warning(
            "teacher checkpoint %s: %d keys without prefix %r were left out (the model's weights all loaded)",
            shown,
            exact.ignored,
            exact.prefix,
        )
    state_dict = exact.state_dict
    metadata = getattr(exact.source, "_metadata", None)
    if metadata is not None:
        # Per-module versions (e.g. BatchNorm's) steer how old checkpoints load: keep them, renamed alike.
        state_dict = _with_metadata(state_dict, metadata, exact.prefix, exact.drop_infix)
    try:
        model = _load_weights(model, state_dict, arch, kwargs)
    except Exception as exc:
        raise StateDictMismatchError(
            f"teacher checkpoint {shown!r} does not load into --arch {arch!r} (--arch-kwargs "
            f"{json.dumps(dict(kwargs))}): {_last_line(str(exc))}; check --arch and --arch-kwargs"
        ) from exc
    return model, exact.layout, exact.stripped


def _with_metadata(state_dict: dict[str, Any], metadata: Mapping[str, Any], prefix: str, drop_infix: bool) -> Any:
    """An OrderedDict of the renamed weights carrying the original ``_metadata``, renamed the same way."""
    result: Any = OrderedDict(state_dict)
    renamed_metadata: dict[str, Any] = {}
    for key, value in metadata.items():
        new = _rename(key, prefix, drop_infix)
        if new is not None:
            renamed_metadata.setdefault(new, value)
    result._metadata = renamed_metadata
    return result


def _listed(items: list[str]) -> str:
    """At most ``_MAX_LISTED`` items, then "and N more": enough to see the pattern on one line."""
    shown = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f", and {len(items) - _MAX_LISTED} more"
    return shown


def _mismatch_message(fit: _Fit, shown: str, arch: str, kwargs: Mapping[str, Any]) -> str:
    """One line naming the file, the arch and every kind of mismatch, then the fix."""
    where = f"layout {fit.layout}" + (f", stripped {fit.stripped}" if fit.stripped else "")
    parts = []
    if fit.missing:
        parts.append(f"missing from the checkpoint ({len(fit.missing)}): {_listed(fit.missing)}")
    if fit.unexpected:
        parts.append(f"unexpected in the checkpoint ({len(fit.unexpected)}): {_listed(fit.unexpected)}")
    if fit.mismatched:
        shapes = [f"{key} checkpoint {list(have)} vs model {list(want)}" for key, have, want in fit.mismatched]
        parts.append(f"shape mismatch ({len(shapes)}): {_listed(shapes)}")
    return (
        f"teacher checkpoint {shown!r} ({where}) does not fit --arch {arch!r} with --arch-kwargs "
        f"{json.dumps(dict(kwargs))}: {'; '.join(parts)}. Check that --arch and --arch-kwargs build the model "
        f"these weights were saved from"
    )


# --- Hugging Face model directories ----------------------------------------------------------------


def _load_hf(spec: str, arch: str | None, kwargs: Mapping[str, Any], device: torch.device, sha256: str | None) -> Teacher:
    """Load ``hf:DIR`` as a causal LM: local files only, no code from the directory, every weight from the files.

    The model is loaded in float32 whatever dtype it was saved in (transformers 5 would otherwise keep the
    saved dtype, 4.x casts to float32): the dump's ``--precision`` chooses a reduced compute dtype through
    autocast, and a cache key without a precision means fp32 logits.
    """
    directory = hf_dir(spec)
    _refuse_arch(spec, "hf", arch, kwargs)
    if not directory.exists():
        raise CheckpointNotFoundError(f"teacher {spec!r}: directory {str(directory)!r} does not exist; check the path")
    if not directory.is_dir():
        raise CheckpointError(
            f"teacher {spec!r}: {str(directory)!r} is a file, not a directory; hf: takes a model directory "
            f"({_HF_DIR_HOLDS}); for a checkpoint file drop the hf: prefix"
        )
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"teacher {spec!r}: {str(directory)!r} has no config.json, so it is not a model directory; {_HF_DIR_HOLDS}")
    transformers = _import_transformers(spec)
    model = _hf_causal_lm(transformers, directory, spec)
    digest = sha256 or teacher_sha256(spec)
    module = _prepare(model, device)
    logger.info("loaded teacher %s: format=hf %s on %s", spec, type(model).__name__, device)
    return Teacher(module=module, path=spec, sha256=digest, format="hf", layout="hf", arch=None, arch_kwargs={})


def _import_transformers(spec: str) -> Any:
    """``transformers``, imported only for ``hf:`` teachers (it takes seconds); MissingPackageError without it."""
    try:
        import transformers
    except ImportError as exc:
        raise MissingPackageError(
            f"teacher {spec!r} is a Hugging Face model directory, which needs the transformers package ({exc}); "
            f"install it with pip install 'logit-cache[hf]' (or pip install transformers)"
        ) from exc
    return transformers


def _dtype_argument(transformers: Any) -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    found = re.match(r"(\d+)\.(\d+)", transformers.__version__)
    version = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    return "dtype" if version >= (4, 56) else "torch_dtype"


def _hf_causal_lm(transformers: Any, directory: Path, spec: str) -> nn.Module:
    """Read the config, check it describes a causal LM, load the weights, and refuse weights left random.

    ``from_pretrained`` initialises every weight the files lack at random and only logs it (a base
    ``BertModel`` directory loads as ``BertLMHeadModel`` with a random LM head); for a teacher that means
    noise in the whole cache, so missing weights are an error here, as ``strict=True`` is for state dicts.
    """
    where = str(directory)
    try:
        config = transformers.AutoConfig.from_pretrained(where, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read the config of teacher {spec!r} ({where}/config.json): {_last_line(str(exc))}; models whose "
            f"code lives in the directory (trust_remote_code) are not supported"
        ) from exc
    model_type = getattr(config, "model_type", None)
    architectures = getattr(config, "architectures", None)
    described = f"model_type {model_type!r}, architectures {architectures}"
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise CheckpointError(
            f"teacher {spec!r}: {where} holds a model that is not a causal language model ({described}); only "
            f"causal LMs (models AutoModelForCausalLM loads: GPT-2, Llama, Mistral, Qwen...) are supported as hf: teachers"
        )
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            where,
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            output_loading_info=True,
            **{_dtype_argument(transformers): torch.float32},
        )
    except Exception as exc:
        raise CheckpointError(f"cannot load teacher {spec!r} ({described}): {_last_line(str(exc))}; {_HF_DIR_HOLDS}") from exc
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(entry[0] if isinstance(entry, tuple) else entry) for entry in info.get("mismatched_keys") or ())
    if missing or mismatched:
        parts = [f"missing ({len(missing)}): {_listed(missing)}"] if missing else []
        parts += [f"shape mismatch ({len(mismatched)}): {_listed(mismatched)}"] if mismatched else []
        raise CheckpointError(
            f"teacher {spec!r} ({described}) does not hold every weight of {type(model).__name__}: {'; '.join(parts)}. "
            f"transformers would initialise these at random and the logits would be noise; save the whole causal LM "
            f"(the ...ForCausalLM / ...LMHeadModel model, with its LM head) with save_pretrained"
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        used_by = type(model).__name__
        logger.info("teacher %s: %d weights in the files are not used by %s: %s", spec, len(unexpected), used_by, _listed(unexpected))
    # A teacher scores each batch once and never generates: a KV cache returned with every output would only
    # hold memory until the batch's logits are taken. This is the instance's config, nothing global.
    model.config.use_cache = False
    return model


def _skipped(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"


def _directory_sha256(directory: Path, spec: str) -> str:
    """The ``hf:DIR`` digest defined in :func:`teacher_sha256`."""
    if not directory.exists():
        raise CheckpointNotFoundError(f"teacher {spec!r}: directory {str(directory)!r} does not exist; check the path")
    if not directory.is_dir():
        raise CheckpointError(f"teacher {spec!r}: {str(directory)!r} is a file, not a directory; for a checkpoint file drop the hf: prefix")
    files: list[tuple[str, Path]] = []
    seen: set[str] = set()  # real paths of the directories walked: a symlink loop is entered once
    for root, dirs, names in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [name for name in dirs if not _skipped(name)]
        for name in names:
            file = Path(root, name)
            if not _skipped(name) and file.is_file():
                files.append((file.relative_to(directory).as_posix(), file))
    digest = hashlib.sha256()
    try:
        for relative, file in sorted(files):
            with open(file, "rb") as handle:
                digest.update(f"{relative}\0{os.fstat(handle.fileno()).st_size}\0".encode())
                while block := handle.read(_READ_BLOCK):
                    digest.update(block)
    except OSError as exc:
        raise CheckpointError(f"cannot read teacher {spec!r} to hash it: {exc}") from exc
    return digest.hexdigest()


# --- ready for inference ----------------------------------------------------------------------------


def _prepare(module: Any, device: torch.device) -> Any:
    """Eval mode, frozen parameters, on the device: a teacher only ever runs inference.

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
    return module.to(device)
