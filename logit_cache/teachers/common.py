"""What every teacher source shares: the checked load request, what a loader returns, and the
argument checks and message helpers the loaders use (split from ``sources.py``, which dispatches).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import sys
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError


@dataclass(frozen=True)
class LoadRequest:
    """What :func:`~logit_cache.teachers.sources.load_teacher` was asked, arguments checked."""

    shown: str
    arch: str | None
    kwargs: Mapping[str, Any]
    device: torch.device
    trust: bool
    #: the dtype the weights are loaded and held in (``--precision``); float32 unless a reduced precision is asked
    dtype: torch.dtype = torch.float32
    #: an ``hf:`` teacher split over devices (:class:`~logit_cache.teachers.placement.Placement`); None: one device
    placement: Any = None


@dataclass(frozen=True)
class Loaded:
    """A loader's result: the module (not yet in eval mode or on the device, unless a device map placed
    it), the manifest's ``format`` and ``layout``, whether ``--arch`` built it, and what the "loaded
    teacher" log line adds."""

    module: Any
    format: str
    layout: str
    detail: str
    uses_arch: bool = False
    #: the loader already gave the weights the request's dtype (else they are cast after loading)
    in_dtype: bool = False
    #: where inputs go when the loader placed the model itself (a device map); None: the request's device
    input_device: torch.device | None = None
    #: module -> device, as placed by a device map (for the manifest)
    device_map: dict[str, str] | None = None


#: How many key names an error lists before it says "and N more": enough to see the pattern, still one line.
MAX_LISTED = 8


def check_arch_kwargs(arch_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
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


def refuse_arch(shown: str, fmt: str, arch: str | None, kwargs: Mapping[str, Any]) -> None:
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


def last_line(message: str) -> str:
    """The informative tail of a long torch message, kept to one line for the CLI."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip() and "documentation" not in line]
    return lines[-1] if lines else message


def listed(items: list[str]) -> str:
    """At most ``MAX_LISTED`` items, then "and N more": enough to see the pattern on one line."""
    shown = ", ".join(items[:MAX_LISTED])
    if len(items) > MAX_LISTED:
        shown += f", and {len(items) - MAX_LISTED} more"
    return shown


def load_mapped(file: Path, weights_only: bool) -> tuple[Any, bool]:
    """``torch.load`` to the CPU, memory-mapped when the file allows it (zip format, since torch 1.6), so a
    multi-GB checkpoint is not read whole into memory; returns (object, whether it is mapped). Files that
    cannot be mapped (legacy format, or not a checkpoint at all) are read as before, with torch's own errors."""
    try:
        return torch.load(file, map_location="cpu", weights_only=weights_only, mmap=True), True
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
    return torch.load(file, map_location="cpu", weights_only=weights_only), False


_MADV_DONTNEED = 4
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def drop_pages(tensor: torch.Tensor) -> None:
    """Let the OS drop the resident pages of a tensor of a memory-mapped checkpoint once it was cast (Linux only).

    Only for tensors of :func:`load_mapped` files: their pages are a private mapping of the file that
    nothing writes, so a later read (none is expected) would fetch the same bytes from the file again;
    on ordinary memory this would zero the tensor. Without it the pages of a float32 file cast to bf16
    stay counted in the process until the whole load ends, making the peak the file plus the result.
    Pages only partly covered by the tensor are kept.
    """
    if _LIBC is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    start = tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()
    stop = start + tensor.numel() * tensor.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    length = (stop // mmap.PAGESIZE) * mmap.PAGESIZE - first
    if length > 0:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(length), _MADV_DONTNEED)


def build_in(factory: Any, kwargs: Mapping[str, Any], dtype: torch.dtype | None) -> Any:
    """Call the factory with ``dtype`` as the default dtype (restored after); a factory that fails so is called plainly."""
    if dtype is None:
        return factory(**kwargs)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return factory(**kwargs)
    except Exception:
        pass
    finally:
        torch.set_default_dtype(previous)
    return factory(**kwargs)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters go to ``meta`` as modules register them (one at a time exists for real); buffers stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def assign_weights(model: nn.Module, state_dict: Any, dtype: torch.dtype | None, mapped: bool) -> nn.Module:
    """The checkpoint's tensors assigned to the model (cast one by one; see ``checkpoints._load_weights``)."""
    wanted = model.state_dict()

    def target(key: str, value: Any) -> Any:
        if key not in wanted or not isinstance(value, torch.Tensor):
            return None
        if dtype is not None and wanted[key].is_floating_point():
            return dtype
        return wanted[key].dtype

    cast = type(state_dict)()
    done: dict[tuple[Any, ...], torch.Tensor] = {}  # tied weights (one storage under two keys) stay one tensor
    for key, value in state_dict.items():
        want = target(key, value)
        if want is None or value.dtype == want:
            cast[key] = value
            continue
        same = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(), want)
        if same not in done:
            done[same] = _cast(value, want, mapped)
        cast[key] = done[same]
    if hasattr(state_dict, "_metadata"):
        # a copy: torch writes "assign_to_params_buffers" into the metadata it is given, which would make the
        # fallback's plain load below assign the checkpoint's own tensors (float32 for a bf16 model) too
        cast._metadata = OrderedDict((name, dict(entry)) for name, entry in state_dict._metadata.items())
    model.load_state_dict(cast, strict=True, assign=True)
    return model


#: How much of a memory-mapped tensor is cast at a time: what is resident of the file beside the result.
CAST_CHUNK_BYTES = 4 << 20


def _cast(value: torch.Tensor, dtype: torch.dtype, mapped: bool) -> torch.Tensor:
    """``value.to(dtype)``; for a tensor of a memory-mapped file, in slices whose pages are dropped as they
    are done, so a float32 embedding of GBs never stands whole in memory beside its bf16 copy."""
    if not mapped or value.dim() == 0 or not value.is_contiguous():
        out = value.to(dtype)
        if mapped:
            drop_pages(value)
        return out
    out = torch.empty(value.shape, dtype=dtype)
    rows = max(1, CAST_CHUNK_BYTES // max(1, value[0].numel() * value.element_size()))
    for start in range(0, value.shape[0], rows):
        part = value[start : start + rows]
        out[start : start + rows].copy_(part)
        drop_pages(part)
    return out
