"""What ``logit-cache info --plot`` draws, computed as plain numpy (no matplotlib here).

Kept apart from the drawing (:mod:`.plots`) so the numbers can be checked without pixels and without
matplotlib: :func:`summarize_cache` reads a cache through the public reader and returns the
histograms a figure shows, with the words that say how each was obtained.

Every quantity is at T=1 (the teacher's own distribution; raw logits are stored). What a row can tell
depends on what its kind stores, read from the :class:`~logit_cache.targets.batch.Targets` fields
rather than from the kind's name:

* every logit (``logits``): the top-1 probability and the entropy are exact;
* the k largest logits and ``logsumexp`` (``values``, ``indices``, ``logsumexp``): the top-1
  probability and the top-k mass are exact; the entropy is bounded, the unstored tail (mass ``r``)
  taken as one bucket (``-r log r``, a lower bound) or spread evenly over the other ``C - k``
  classes (``-r log(r / (C - k))``, an upper bound, the tail model the losses use);
* drawn ids with counts (``counts``): the number of distinct ids per row; with the drawn ids' logits
  stored (``values``) their exact probabilities give a lower bound of the top-1 probability and the
  entropy (the undrawn mass as one bucket); without them, the plug-in estimate from ``counts / M``.

Large caches are sampled, seeded and bounded: at most ``max_rows`` rows, drawn uniformly when the
reader holds the cache in memory, else as whole random chunks (one read per chunk, never one per row).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..io.rows import TargetReader
from ..targets import Targets, get_kind

#: At most this many rows are read to draw a cache (a seeded sample beyond it).
MAX_PLOT_ROWS = 200_000
#: Bins of the histograms over a continuous range.
BINS = 50
#: The entropy panel's axis.
ENTROPY_LABEL = "teacher's entropy at T=1 (nats)"
#: About how many float64 values one block of rows expands to while computing (bounds memory for wide rows).
BLOCK_VALUES = 4 << 20


@dataclass
class Histogram:
    """Counts over bins: ``counts[i]`` values in ``[edges[i], edges[i+1])`` (the last bin closed)."""

    edges: np.ndarray
    counts: np.ndarray
    #: What was counted, for the axis ("teacher's top-1 probability").
    label: str
    #: How it was obtained, for the legend ("exact", "tail as one bucket: lower bound").
    note: str = ""
    #: The mean of the values counted (a figure's summary line).
    mean: float = float("nan")


@dataclass
class CacheSummary:
    """What a cache holds, as the figure of ``logit-cache info --plot`` shows it."""

    path: str
    #: The kind and width in words ("top-5"), the class count, dtype, encoding, per token.
    description: str
    num_classes: int
    num_rows: int
    num_samples: int
    views: int
    per_token: bool
    #: The rows the distribution panels were computed from (sorted cache rows).
    rows: np.ndarray
    #: How those rows were chosen ("all 300 rows", "a seeded sample of ...").
    sample_note: str
    top1: Histogram
    #: One entropy histogram, or two (the bounds) for kinds that do not store every probability.
    entropy: list[Histogram]
    #: The top-k mass captured per row, or (rows of drawn ids) the number of distinct ids per row.
    coverage: Histogram | None
    #: Per-class counts of the stored ``labels`` (per sample), when the cache holds labels.
    label_counts: np.ndarray | None = None
    #: Tokens per sequence (per-token caches), from the shards' offsets.
    tokens: Histogram | None = None


def choose_rows(reader: TargetReader, max_rows: int, seed: int) -> tuple[np.ndarray, str]:
    """The rows to read (sorted) and the words that say how they were chosen.

    All rows when there are at most ``max_rows``; else a seeded uniform sample when the cache is held in
    memory, or whole chunks chosen at random (bounded reads of a large cache on disk)."""
    total = reader.num_rows
    if total <= max_rows:
        return np.arange(total, dtype=np.int64), f"all {total:,} rows"
    rng = np.random.default_rng(seed)
    if reader.in_memory:
        rows = np.sort(rng.choice(total, size=max_rows, replace=False)).astype(np.int64)
        return rows, f"a seeded random sample of {max_rows:,} of {total:,} rows (seed {seed})"
    starts = reader.chunk_starts
    picked, count = [], 0
    for chunk in rng.permutation(len(starts) - 1):
        if count >= max_rows:
            break
        first, stop = int(starts[chunk]), int(starts[chunk + 1])
        stop = min(stop, first + max_rows - count)
        picked.append(np.arange(first, stop, dtype=np.int64))
        count += stop - first
    rows = np.sort(np.concatenate(picked))
    return rows, f"a seeded sample of {len(rows):,} of {total:,} rows in {len(picked)} whole chunks chosen at random (seed {seed})"


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=1, keepdims=True)
    shifted = logits - top
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _entropy(p: np.ndarray) -> np.ndarray:
    """``-sum p log p`` per row, 0 log 0 taken as 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=1)


def _bucket(rest: np.ndarray, spread_over: float = 1.0) -> np.ndarray:
    """``-r log(r / n)``: the entropy of mass ``r`` spread evenly over ``n`` classes (one bucket: n=1)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(rest > 0, -rest * (np.log(np.where(rest > 0, rest, 1.0)) - np.log(max(spread_over, 1.0))), 0.0)


def row_quantities(targets: Targets) -> dict[str, np.ndarray]:
    """Per-row quantities of one batch at T=1, by what the batch holds (module docstring): ``top1``, one or two
    entropies (``entropy``; ``entropy_low``/``entropy_high``), and ``mass`` or ``distinct``."""
    if targets.logits is not None:  # every logit
        logp = _log_softmax(targets.logits.numpy().astype(np.float64))
        p = np.exp(logp)
        return {"top1": p.max(axis=1), "entropy": _entropy(p)}
    if targets.counts is not None:  # drawn ids with counts
        counts = targets.counts.numpy().astype(np.int64)
        drawn = counts > 0
        out = {"distinct": drawn.sum(axis=1).astype(np.float64)}
        if targets.values is not None:  # the drawn ids' raw logits: their exact probabilities
            lse = targets.logsumexp.numpy().astype(np.float64)[:, None]
            p = np.where(drawn, np.exp(targets.values.numpy().astype(np.float64) - lse), 0.0)
            rest = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
            out.update(top1=p.max(axis=1), entropy=_entropy(p) + _bucket(rest))
        else:
            p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
            out.update(top1=p.max(axis=1), entropy=_entropy(p))
        return out
    if targets.values is not None and targets.logsumexp is not None:  # the k largest logits and logsumexp
        lse = targets.logsumexp.numpy().astype(np.float64)[:, None]
        p = np.exp(targets.values.numpy().astype(np.float64) - lse)
        mass = p.sum(axis=1)
        rest = np.clip(1.0 - mass, 0.0, 1.0)
        known = _entropy(p)
        tail = targets.num_classes - p.shape[1]
        return {"top1": p.max(axis=1), "mass": mass, "entropy_low": known + _bucket(rest),
                "entropy_high": known + (_bucket(rest, tail) if tail > 0 else 0.0)}
    raise UsageError(f"cannot draw {targets.mode!r} targets: they hold neither logits, top-k values with logsumexp, nor drawn ids")


def _histogram(values: np.ndarray, edges: np.ndarray, label: str, note: str = "") -> Histogram:
    clipped = np.clip(values, edges[0], edges[-1])
    counts, _ = np.histogram(clipped, bins=edges)
    return Histogram(edges, counts.astype(np.int64), label, note, float(values.mean()) if len(values) else float("nan"))


def integer_edges(low: int, high: int) -> np.ndarray:
    """Bins centred on the integers ``low..high`` (at most ``BINS`` of them, else ``BINS`` even bins)."""
    if high - low < BINS:
        return np.arange(low - 0.5, high + 1.5)
    return np.linspace(low, high, BINS + 1)


def _read_quantities(reader: TargetReader, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The per-row quantities of ``rows``, read and computed in blocks of bounded size."""
    manifest = reader.manifest
    widest = max([int(np.prod(spec["row_shape"], dtype=np.int64)) for spec in manifest.arrays.values()] + [1])
    widest = max(widest, get_kind(manifest.mode).width(manifest) or 1)  # a compact row decodes to its width
    block = max(256, BLOCK_VALUES // widest)
    parts: dict[str, list[np.ndarray]] = {}
    for first in range(0, len(rows), block):
        for name, values in row_quantities(reader.targets(rows[first : first + block])).items():
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def summarize_cache(path: str | Path, max_rows: int = MAX_PLOT_ROWS, seed: int = 0) -> CacheSummary:
    """Read ``path`` through the public reader and compute what its figure shows (module docstring)."""
    if max_rows < 1:
        raise UsageError(f"the number of rows to draw must be >= 1, got {max_rows}")
    with TargetReader(path) as reader:
        manifest = reader.manifest
        kind = get_kind(manifest.mode)
        classes = manifest.num_classes
        description = f"{kind.describe(kind.width(manifest))} of {classes:,} classes, {manifest.dtype}"
        description += f", {manifest.encoding} encoding" if manifest.encoding != "plain" else ""
        description += ", per token" if manifest.per_token else ""
        rows, note = choose_rows(reader, max_rows, seed)
        values = _read_quantities(reader, rows)
        unit = np.linspace(0.0, 1.0, BINS + 1)
        nats = np.linspace(0.0, float(np.log(classes)) if classes > 1 else 1.0, BINS + 1)
        width = kind.width(manifest)
        top1_note = entropy_note = "exact"
        if "distinct" in values:  # drawn ids: with their logits (Ts != 1) exact probabilities of the drawn, else counts / M
            drawn_logits = len(rows) > 0 and reader.targets(rows[:1]).values is not None
            top1_note = "lower bound: the largest drawn id's exact probability" if drawn_logits else "estimated from counts / M"
            entropy_note = ("lower bound: the drawn ids' exact probabilities, the undrawn mass as one bucket" if drawn_logits
                            else "estimated from counts / M (plug-in estimate, biased low)")
        if "entropy" in values:
            entropy = [_histogram(values["entropy"], nats, ENTROPY_LABEL, entropy_note)]
        else:
            rest = f"the other {classes - width:,} classes" if width is not None else "the unstored classes"
            entropy = [_histogram(values["entropy_low"], nats, ENTROPY_LABEL, "lower bound: the tail as one bucket"),
                       _histogram(values["entropy_high"], nats, ENTROPY_LABEL, f"upper bound: the tail spread evenly over {rest}")]
        coverage = None
        if "mass" in values:
            coverage = _histogram(values["mass"], unit, "probability mass of the stored top-k at T=1", "exact, from logsumexp")
        elif "distinct" in values:
            draws = int(width or values["distinct"].max())
            coverage = _histogram(values["distinct"], integer_edges(1, draws), f"distinct ids per row (of {draws} draws)")
        labels = None
        if "labels" in manifest.arrays:
            stored = reader.read("labels").astype(np.int64).reshape(-1)
            labels = np.bincount(stored[(stored >= 0) & (stored < classes)], minlength=classes)
        tokens = None
        if reader.offsets is not None:
            lengths = np.diff(reader.offsets)
            if len(lengths):
                tokens = _histogram(lengths.astype(np.float64), integer_edges(int(lengths.min()), int(lengths.max())),
                                    "tokens per sequence", f"all {len(lengths):,} sequences, from the offsets")
        return CacheSummary(
            path=str(reader.path), description=description, num_classes=classes, num_rows=manifest.num_rows,
            num_samples=manifest.num_samples, views=manifest.views, per_token=manifest.per_token, rows=rows, sample_note=note,
            top1=_histogram(values["top1"], unit, "teacher's top-1 probability at T=1", top1_note), entropy=entropy,
            coverage=coverage, label_counts=labels, tokens=tokens,
        )
