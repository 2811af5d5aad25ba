"""Running a model: which device, which precision, how inputs reach it and logits come back.

Shared by the dump (the teacher), the trainer (teacher and student) and verify, so that every
caller moves inputs, autocasts and unwraps outputs the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import TeacherOutputError, UsageError

#: ``--precision`` -> the autocast dtype (None: float32, no autocast).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def weights_dtype(precision: str | torch.dtype) -> torch.dtype:
    """The dtype a teacher's weights are held in for ``--precision`` (float32 for ``fp32``); a dtype passes through."""
    if isinstance(precision, torch.dtype):
        if precision not in (torch.float32, *[dtype for dtype in PRECISIONS.values() if dtype is not None]):
            raise UsageError(f"precision {precision} is not one of torch.float32, torch.bfloat16, torch.float16")
        return precision
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision] or torch.float32


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` means the GPU when there is one; ``cuda`` under torchrun means this rank's GPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UsageError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec} asked for a GPU, but torch sees none; use --device cpu (or auto)")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: GPU {index} does not exist (torch sees {torch.cuda.device_count()})")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise UsageError(f"--device {spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors, and tensors inside dicts, lists and tuples (model inputs), moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value


def run_model(module: Any, inputs: Any) -> torch.Tensor:
    """Call a model (teacher or student): dict inputs become keyword arguments; ``.logits`` outputs are unwrapped."""
    output = module(**inputs) if isinstance(inputs, Mapping) else module(inputs)
    if not isinstance(output, torch.Tensor) and hasattr(output, "logits"):
        output = output.logits
    if not isinstance(output, torch.Tensor):
        raise TeacherOutputError(
            f"the teacher returned a {type(output).__name__}; expected a tensor of logits [batch, classes] "
            f"(or an object with a .logits tensor)"
        )
    return output


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


#: The name the dump and verify used before students were called through here too.
run_teacher = run_model
