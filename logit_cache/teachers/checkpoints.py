"""``torch.save`` teachers: a state dict (weights only, built by ``--arch``) or a pickled ``nn.Module``.

A state dict is read with ``weights_only=True``; unpickling anything else runs code from the file and
needs ``trust_checkpoint``. Training checkpoints nest the weights (``{"model": sd}``, Lightning's
``{"state_dict": sd}``, Composer's ``{"state": {"model": sd}}``) and wrappers prefix their keys
(``module.``, ``model.``, ``_orig_mod.``): every (layout, prefix) reading is tried and the one whose keys
fit the ``--arch`` model exactly wins; none fitting is a StateDictMismatchError naming the closest.

Weights are held in the dtype asked (``--precision``): the file is memory-mapped (``torch.load(mmap=True)``),
the model is built on the ``meta`` device, and each tensor is cast as it is assigned, so neither the file
nor a float32 model is ever held whole in memory besides the result.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, SpecError, StateDictMismatchError, UntrustedCheckpointError
from ..specs import resolve_callable
from .common import (
    MAX_LISTED,
    Loaded,
    LoadRequest,
    assign_weights,
    build_in,
    last_line,
    listed,
    load_mapped,
    parameters_on_meta,
    refuse_arch,
)

logger = logging.getLogger(__name__)

#: Wrapper prefixes that training tools put in front of a model's own keys: DDP / Composer (``module.``),
#: Lightning (``model.``, the conventional attribute name), ``torch.compile`` (``_orig_mod.``).
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
#: Where training checkpoints keep the model's weights, tried in this order (``layout`` names the place).
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
#: Fragments of torch's weights-only error that mean "a Python object is pickled here" (as opposed to a
#: corrupt or non-pickle file, which torch reports through the same exception type).
_PICKLED_OBJECT_MARKERS = ("GLOBAL ", "unrecognized function", "Can only create new object", "Can only build")


def load_torch(file: Path, request: LoadRequest) -> Loaded:
    """The ``torch`` source (a ``torch.save`` file): a pickled module (trusted only) or a state dict."""
    shown, arch, kwargs = request.shown, request.arch, request.kwargs
    obj, mapped = _torch_load(file, shown, request.trust)
    if isinstance(obj, nn.Module):  # cast after loading, by load_teacher (its own code built it)
        refuse_arch(shown, "pickle", arch, kwargs)
        return Loaded(obj, "pickle", "pickle", "layout=pickle, keys used as saved")
    candidates = _state_dict_candidates(obj, shown)
    if arch is None:
        where = ", ".join(sorted({layout for layout, _ in candidates}))
        raise CheckpointError(
            f"teacher checkpoint {shown!r} holds weights (a state dict, layout {where}) but no "
            f"architecture; pass --arch MODULE:CALLABLE naming the function or class that builds the "
            f"model (and --arch-kwargs with its arguments as JSON)"
        )
    dtype = None if request.dtype == torch.float32 else request.dtype
    model = _build_arch(arch, kwargs, dtype=dtype)
    model, layout, stripped = _load_best_candidate(model, candidates, shown, arch, kwargs, dtype, mapped)
    detail = f"layout={layout}" + (f", stripped {stripped} from the keys" if stripped else ", keys used as saved")
    return Loaded(model, "state_dict", layout, detail, uses_arch=True, in_dtype=True)


def _build_arch(arch: str, kwargs: Mapping[str, Any], on_meta: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Resolve and call the --arch factory; a failure names the spec and kwargs (SpecError).

    With ``on_meta`` the model is first built on the ``meta`` device: no memory is allocated and no
    random initialisation runs, which the checkpoint's weights would overwrite anyway (0.2 s for a
    39M-parameter MLP, seconds for a big teacher). A factory that cannot build on ``meta`` is built
    normally, under ``dtype`` as torch's default dtype when one is asked (so its random weights are not
    made in float32 first), then cast; see :func:`_load_weights` for the other fallback.
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
        model = build_in(factory, kwargs, dtype)
    except Exception as exc:
        raise SpecError(
            f"--arch {arch!r} with --arch-kwargs {json.dumps(kwargs)} failed to build the model: {exc!r}; "
            f"check that the kwargs match the callable's signature"
        ) from exc
    if not isinstance(model, nn.Module):
        raise SpecError(f"--arch {arch!r} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model if dtype is None else model.to(dtype)


def _is_on_meta(model: nn.Module) -> bool:
    return any(tensor.is_meta for tensor in (*model.parameters(), *model.buffers()))


def _load_weights(model: nn.Module, state_dict: Any, arch: str, kwargs: Mapping[str, Any], dtype: torch.dtype | None = None,
                  mapped: bool = False) -> nn.Module:
    """Load ``state_dict`` strictly into ``model``; returns the loaded model.

    A model built on ``meta`` takes the checkpoint's tensors (``assign=True``), cast to the model's own
    dtypes as a normal load would, or to ``dtype`` (floating-point tensors): one at a time, the pages of
    a cast tensor of a memory-mapped file dropped after it (:func:`~.common.drop_pages`). A buffer left
    on ``meta`` (one state dicts do not hold: rotary frequencies, a position table) makes it build the
    model again with only its parameters on ``meta``; failing that, for real, loaded the usual way: the
    result never depends on the shortcuts.
    """
    if not _is_on_meta(model):
        model.load_state_dict(state_dict, strict=True)
        return model
    saved = set(model.state_dict())
    if any(buffer.is_meta for name, buffer in model.named_buffers() if name not in saved):
        try:  # decided before assigning: the weights are cast once, and one model holds them
            with parameters_on_meta():
                model = _build_arch(arch, kwargs, on_meta=False, dtype=dtype)
        except Exception:  # some factories compute on their parameters in __init__: built for real below
            pass
    if _is_on_meta(model):
        model = assign_weights(model, state_dict, dtype, mapped)
    if _is_on_meta(model):
        model = _build_arch(arch, kwargs, on_meta=False, dtype=dtype)
        model.load_state_dict(state_dict, strict=True)
    return model


def _torch_load(file: Path, shown: str, trust: bool) -> tuple[Any, bool]:
    """``torch.load`` weights-only; fall back to full unpickling only for a trusted file. Also says
    whether the file is memory-mapped (see :func:`~logit_cache.teachers.common.load_mapped`).

    torch reports a pickled Python object and a corrupt file through the same ``UnpicklingError``; the
    "GLOBAL ..." part of its message is what tells a pickled object apart.
    """
    try:
        return load_mapped(file, weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "Weights only load failed" not in message or not any(m in message for m in _PICKLED_OBJECT_MARKERS):
            raise CheckpointError(
                f"cannot load teacher checkpoint {shown!r}: it is not a PyTorch checkpoint or it is corrupted "
                f"({last_line(message)})"
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
            f"({type(exc).__name__}: {last_line(str(exc))})"
        ) from exc
    logger.warning("unpickling teacher checkpoint %s with weights_only=False (--trust-checkpoint)", shown)
    try:
        obj, mapped = load_mapped(file, weights_only=False)
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
    return obj, mapped


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
        keys = ", ".join(repr(k) for k in list(obj)[:MAX_LISTED])
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
    dtype: torch.dtype | None = None,
    mapped: bool = False,
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
        model = _load_weights(model, state_dict, arch, kwargs, dtype, mapped)
    except Exception as exc:
        raise StateDictMismatchError(
            f"teacher checkpoint {shown!r} does not load into --arch {arch!r} (--arch-kwargs "
            f"{json.dumps(dict(kwargs))}): {last_line(str(exc))}; check --arch and --arch-kwargs"
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


def _mismatch_message(fit: _Fit, shown: str, arch: str, kwargs: Mapping[str, Any]) -> str:
    """One line naming the file, the arch and every kind of mismatch, then the fix."""
    where = f"layout {fit.layout}" + (f", stripped {fit.stripped}" if fit.stripped else "")
    parts = []
    if fit.missing:
        parts.append(f"missing from the checkpoint ({len(fit.missing)}): {listed(fit.missing)}")
    if fit.unexpected:
        parts.append(f"unexpected in the checkpoint ({len(fit.unexpected)}): {listed(fit.unexpected)}")
    if fit.mismatched:
        shapes = [f"{key} checkpoint {list(have)} vs model {list(want)}" for key, have, want in fit.mismatched]
        parts.append(f"shape mismatch ({len(shapes)}): {listed(shapes)}")
    return (
        f"teacher checkpoint {shown!r} ({where}) does not fit --arch {arch!r} with --arch-kwargs "
        f"{json.dumps(dict(kwargs))}: {'; '.join(parts)}. Check that --arch and --arch-kwargs build the model "
        f"these weights were saved from"
    )
