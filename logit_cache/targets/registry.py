"""The target-kind registry: what each kind of cached target (full logits, top-k, sampled ids) is.

A kind is one object (:class:`TargetKind`, one subclass per module: ``full.py``, ``topk.py``,
``sampled.py``) that knows everything mode-specific: its width field (``k``, ``m`` or none), the
arrays it stores and how they are encoded on the device, laid out plainly or compactly, checked in a
manifest, keyed, named and turned into a :class:`~logit_cache.targets.batch.Targets` batch. Everything
else (the manifest, the dump, the reader, convert, verify, the CLI) asks the kind instead of comparing
mode names, so a new kind is one module that calls :func:`register` (tests/test_target_registry.py
registers one and dumps and reads it with no other file changed).

This module imports nothing of the kinds (they import it); the kinds are registered when
``logit_cache.targets`` is imported. It takes manifests and dump configs duck-typed (``record``): it
sits below ``format/``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..store.base import ArraySpec

#: Both losses; a kind's ``losses`` names those that can read it.
ALL_LOSSES = frozenset({"kd_loss", "token_kd_loss"})


class TargetKind:
    """One kind of cached target. Subclasses set the attributes and implement the methods marked so.

    ``record`` arguments are a Manifest or a DumpConfig (anything with the fields ``mode``, ``k``,
    ``m``, ``sample_temperature``...): read duck-typed.
    """

    #: The manifest's ``mode``.
    name: str = ""
    #: The manifest/DumpConfig field holding the width ("k", "m"), or None (full logits have none).
    width_field: str | None = None
    #: Logical arrays a loader reads (always present), and those present only sometimes.
    target_arrays: tuple[str, ...] = ()
    optional_arrays: tuple[str, ...] = ()
    #: Stored arrays that older caches hold in another dtype, read alike: name -> those dtypes.
    older_dtypes: Mapping[str, tuple[str, ...]] = {}
    #: Arrays of logit values in the value dtype (what ``convert --dtype`` changes).
    value_arrays: tuple[str, ...] = ()
    #: Supports ``encoding="compact"`` (then :meth:`compact_specs`, :meth:`compact_encode`, :meth:`compact_decode`).
    compact: bool = False
    #: Loss functions that can read it.
    losses: frozenset[str] = ALL_LOSSES
    #: The dump option that chooses it, for messages ("--topk K"); its first word is the flag.
    option: str = ""
    #: Encoding draws at random: the dump seeds a generator per item (and defaults ``seed`` to 0).
    draws: bool = False
    #: Only for per-token (language-model) datasets.
    per_token_only: bool = False
    #: Stores every logit of every row (the dump states the size up front).
    dense: bool = False
    #: The :class:`Targets` field with one row per cache row.
    rows_field: str = "values"

    # -- identity and naming ----------------------------------------------------------------------
    @property
    def flag(self) -> str:
        """The dump's flag for this kind (``--topk``)."""
        return self.option.split()[0] if self.option else f"--{self.name}"

    def width(self, record: Any) -> int | None:
        """The record's width (its k or m), None for a kind without one."""
        return None if self.width_field is None else getattr(record, self.width_field, None)

    def max_width(self, num_classes: int) -> int | None:
        """The largest width ``num_classes`` classes allow (None: no limit from the class count)."""
        return None

    def label(self, width: int | None) -> str:
        """Short, for directory names: ``top5``, ``sample50``, ``full``."""
        return self.name

    def describe(self, width: int | None) -> str:
        """For people: ``top-5``, ``sample-50``, ``full logits``."""
        return self.name

    def validate(self, record: Any, bad: Callable[[str, str], Exception]) -> None:
        """Kind-specific manifest checks; ``bad(field, why)`` is the exception to raise."""

    def check_options(self, record: Any) -> None:
        """Kind-specific checks of a dump's options (a DumpConfig); raise UsageError."""

    def key_fields(self, record: Any) -> dict[str, Any]:
        """The kind's identity fields beyond mode, k, dtype... (sampled: m and the sample temperature)."""
        return {}

    # -- encoding on the device -------------------------------------------------------------------
    def device_value_dtype(self, dtype: str, encoding: str) -> str:
        """The dtype values leave the device in for a cache of value dtype ``dtype`` and ``encoding``."""
        return dtype

    def encode(self, raw: torch.Tensor, width: int | None, dtype: str, *, sample_temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Any:
        """Encode logits [B, C] for storage (an :class:`~logit_cache.targets.encoded.EncodedBatch`);
        nothing here synchronises with the device."""
        raise NotImplementedError

    def row_mass(self, arrays: Mapping[str, torch.Tensor], rows: int, like: torch.Tensor) -> torch.Tensor:
        """The summed probability mass at T=1 of encoded ``arrays`` (``rows`` rows), recomputed after rows
        were dropped; the row count for kinds that store every probability (a 0-d tensor like ``like``)."""
        return like.new_full((), float(rows), dtype=torch.float32)

    # -- stored layout ----------------------------------------------------------------------------
    def array_specs(self, width: int | None, num_classes: int, dtype: str, *, sampled_logits: bool = False) -> list[ArraySpec]:
        """The target arrays of the plain encoding (the logical arrays), in order."""
        raise NotImplementedError

    def compact_specs(self, width: int, num_classes: int, dtype: str, *, sampled_logits: bool = False) -> list[ArraySpec]:
        """The target arrays of the compact encoding (``targets/compact.py``)."""
        raise UsageError(f"the {self.name} kind has no compact encoding")

    def compact_encode(self, arrays: Mapping[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
        raise UsageError(f"the {self.name} kind has no compact encoding")

    def compact_decode(self, stored: Mapping[str, np.ndarray], num_classes: int, dtype: str) -> dict[str, np.ndarray]:
        raise UsageError(f"the {self.name} kind has no compact encoding")

    # -- reading ----------------------------------------------------------------------------------
    def batch(self, num_classes: int, arrays: Mapping[str, np.ndarray], *, sample_temperature: float = 1.0,
              lengths: np.ndarray | None = None) -> Any:
        """A :class:`~logit_cache.targets.batch.Targets` from the cache's logical arrays (numpy, no copy)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<target kind {self.name!r}>"


#: Every registered kind, by name, in registration order.
KINDS: dict[str, TargetKind] = {}


def register(kind: TargetKind) -> TargetKind:
    """Add ``kind`` under its name (replacing one of that name); returns it, so a module can write
    ``KIND = register(TopK())``."""
    if not kind.name:
        raise UsageError("a target kind needs a name")
    KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a kind (tests that register a toy kind remove it afterwards)."""
    KINDS.pop(name, None)


def kind_names() -> tuple[str, ...]:
    """The registered kinds' names, in registration order."""
    return tuple(KINDS)


def get_kind(name: str) -> TargetKind:
    """The kind registered under ``name``; UsageError naming the known ones otherwise."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown mode {name!r}; expected one of {', '.join(KINDS)}") from None
