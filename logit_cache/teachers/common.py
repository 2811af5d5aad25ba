"""What every teacher source shares: the checked load request, what a loader returns, and the
argument checks and message helpers the loaders use (split from ``sources.py``, which dispatches).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageError


@dataclass(frozen=True)
class LoadRequest:
    """What :func:`~logit_cache.teachers.sources.load_teacher` was asked, arguments checked."""

    shown: str
    arch: str | None
    kwargs: Mapping[str, Any]
    device: torch.device
    trust: bool


@dataclass(frozen=True)
class Loaded:
    """A loader's result: the module (not yet in eval mode or on the device), the manifest's ``format``
    and ``layout``, whether ``--arch`` built it, and what the "loaded teacher" log line adds."""

    module: Any
    format: str
    layout: str
    detail: str
    uses_arch: bool = False


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
