"""Figures: what a cache holds (``logit-cache info CACHE --plot FILE.png``) and learning curves.

matplotlib is an optional extra (``pip install 'logit-cache[plot]'``), imported only when a figure
is drawn; without it :class:`~logit_cache.errors.MissingPackageError` names the extra. Figures are
drawn with the object-oriented API on an Agg canvas: no display, no pyplot state, nothing changed for
a caller who uses pyplot themselves.

The numbers come from :mod:`.plot_data` (plain numpy, checked without pixels); each drawing function
returns what it drew, read back from the figure's artists, so a test can check that the picture shows
those numbers.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingPackageError, OutputError, UsageError
from .plot_data import MAX_PLOT_ROWS, CacheSummary, Histogram, summarize_cache

#: Figure size in inches and resolution: 1200 x 800 pixels, readable at 100%.
FIGSIZE = (12.0, 8.0)
DPI = 100
INSTALL_HINT = "pip install 'logit-cache[plot]'"
#: What the learning-curve panels show, in order: record field, axis label (with units), panel title.
CURVES = (
    ("train_loss", "train loss (nats per {unit})", "training loss"),
    ("eval_accuracy", "eval accuracy (fraction correct)", "eval accuracy"),
    ("eval_perplexity", "eval perplexity (per token)", "eval perplexity"),
    ("eval_kl", "eval KL (nats per {unit})", "eval KL(teacher || student) at T=1"),
    ("seconds", "epoch time (s)", "time per epoch"),
)


def require_matplotlib() -> None:
    """Fail before long work (a training run, the demo) that ends in a figure, not after it."""
    _figure()


def _figure() -> Any:
    """A new Figure on an Agg canvas; MissingPackageError naming the extra without matplotlib."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingPackageError(f"drawing figures needs matplotlib, which is not installed: {INSTALL_HINT}") from exc
    with matplotlib.rc_context({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 9.5}):
        figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, out: Path) -> Path:
    """Write ``figure`` to ``out`` (format from the suffix, PNG when none) at the figure's own size."""
    out = Path(out)
    try:
        figure.savefig(out, dpi=DPI, format=None if out.suffix else "png")
    except OSError as exc:
        raise OutputError(f"cannot write the figure to {out}: {exc.strerror or exc}") from exc
    return out


def _wrap(label: str, width: int = 40) -> str:
    """A legend entry on lines of at most ``width`` characters, so a long note does not squeeze its panel."""
    return textwrap.fill(label, width)


def _stairs(ax: Any, hist: Histogram, label: str, **style: Any) -> np.ndarray:
    """Draw ``hist`` as a step histogram; return the counts read back from the artist."""
    artist = ax.stairs(hist.counts, hist.edges, label=_wrap(label), **style)
    return np.asarray(artist.get_data().values)


def _message(ax: Any, text: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, color="0.35")


def _summary_text(summary: CacheSummary) -> str:
    lines = [f"rows: {summary.num_rows:,}", f"samples: {summary.num_samples:,} x {summary.views} view(s)",
             f"mean top-1 probability: {summary.top1.mean:.3f}"]
    lines += [f"mean entropy ({h.note}): {h.mean:.3f} nats" for h in summary.entropy]
    if summary.coverage is not None:
        lines.append(f"mean {summary.coverage.label}: {summary.coverage.mean:.3f}")
    return "\n".join(lines)


@dataclass
class CachePlot:
    """A drawn cache figure: where it went, the numbers (:class:`CacheSummary`) and what each panel drew."""

    out: Path
    summary: CacheSummary
    #: Panel -> the heights drawn, read back from the figure: ``top1``, ``entropy`` (and ``entropy_high``),
    #: ``coverage``, ``labels``, ``tokens``.
    drawn: dict[str, np.ndarray]


def draw_cache(summary: CacheSummary, out: Path) -> dict[str, np.ndarray]:
    """Draw ``summary`` to ``out`` (PNG, 1200 x 800): top-1 probability, entropy, the top-k mass or the
    distinct drawn ids, and the labels per class or tokens per sequence. Returns what each panel drew."""
    figure = _figure()
    (top, ent), (cov, last) = figure.subplots(2, 2)
    rows = "token rows" if summary.per_token else ("rows (sample views)" if summary.views > 1 else "rows (samples)")
    drawn: dict[str, np.ndarray] = {}

    drawn["top1"] = _stairs(top, summary.top1, summary.top1.note, fill=True, alpha=0.6, color="C0")
    top.axvline(summary.top1.mean, color="k", linestyle="--", linewidth=1, label=f"mean {summary.top1.mean:.3f}")
    top.set(xlabel=summary.top1.label, ylabel=rows, title="How sure the teacher is", xlim=(0, 1))

    for position, hist in enumerate(summary.entropy):
        key = "entropy" if position == 0 else "entropy_high"
        drawn[key] = _stairs(ent, hist, f"{hist.note}, mean {hist.mean:.3f}", color=f"C{position}", linewidth=1.8,
                             fill=len(summary.entropy) == 1, alpha=0.6 if len(summary.entropy) == 1 else 1.0)
    ent.set(xlabel=summary.entropy[0].label + f"; max log C = {math.log(max(summary.num_classes, 1)):.2f}", ylabel=rows,
            title="How spread the teacher's distribution is", xlim=(summary.entropy[0].edges[0], summary.entropy[0].edges[-1]))

    if summary.coverage is not None:
        hist = summary.coverage
        drawn["coverage"] = _stairs(cov, hist, hist.note or "exact", fill=True, alpha=0.6, color="C2")
        cov.axvline(hist.mean, color="k", linestyle="--", linewidth=1, label=f"mean {hist.mean:.3f}")
        cov.set(xlabel=hist.label, ylabel=rows, xlim=(hist.edges[0], hist.edges[-1]),
                title="What the cache keeps of each distribution" if hist.note else "Distinct ids drawn per row")
    else:
        _message(cov, "every probability is stored (full logits):\nnothing to measure of what is kept\n\n" + _summary_text(summary))

    if summary.label_counts is not None:
        counts = summary.label_counts
        bars = last.bar(np.arange(len(counts)), counts, width=0.8 if len(counts) <= 100 else 1.0, color="C3")
        drawn["labels"] = np.asarray([bar.get_height() for bar in bars])
        last.set(xlabel="class (label id)", ylabel="samples", title=f"Stored labels per class (all {int(counts.sum()):,} labelled samples)")
        if len(counts) <= 30:
            last.set_xticks(np.arange(len(counts)))
    elif summary.tokens is not None:
        hist = summary.tokens
        drawn["tokens"] = _stairs(last, hist, hist.note, fill=True, alpha=0.6, color="C4")
        last.axvline(hist.mean, color="k", linestyle="--", linewidth=1, label=f"mean {hist.mean:.1f}")
        last.set(xlabel="tokens per sequence (rows)", ylabel="sequences", title="Sequence lengths")
    else:
        _message(last, "no labels stored\n\n" + _summary_text(summary))

    for ax, key in ((top, "top1"), (ent, "entropy"), (cov, "coverage")):
        counts = drawn.get(key)
        if counts is not None and counts.sum() and counts.max() > 0.5 * counts.sum():
            # most rows in one bin (a confident teacher): a log scale shows the few rows that differ
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.8)
            ax.set_ylabel(f"{rows} (log scale)")
    for ax in (top, ent, cov, last):
        if ax.axison:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best", framealpha=0.9)
            ax.grid(alpha=0.3)
    figure.suptitle(f"{summary.path}\n{summary.description}; {summary.num_rows:,} rows ({summary.num_samples:,} "
                    f"{'sequences' if summary.per_token else 'samples'} x {summary.views} view(s)); "
                    f"histograms over {summary.sample_note}", fontsize=12)
    _save(figure, out)
    return drawn


def plot_cache(path: str | Path, out: Path, max_rows: int = MAX_PLOT_ROWS, seed: int = 0) -> CachePlot:
    """Read the cache at ``path`` (at most ``max_rows`` rows, seeded) and draw what it holds to ``out``.

    Needs matplotlib (checked before the cache is read)."""
    _figure()  # fail on a missing matplotlib before reading anything
    summary = summarize_cache(path, max_rows=max_rows, seed=seed)
    return CachePlot(Path(out), summary, draw_cache(summary, Path(out)))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_learning_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], out: Path,
                         title: str | None = None) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Draw the learning curves of one or more runs on one figure, one colour per run.

    ``histories``: run name -> its per-epoch records, as the trainer writes them (``epochs`` of
    ``*.metrics.json``: ``epoch``, ``train_loss``, ``seconds`` and ``eval_accuracy`` or
    ``eval_perplexity``, ``eval_kl`` when evaluated). A panel is drawn for each field some run has;
    epochs without a field (not evaluated) are skipped. Returns panel field -> run -> (epochs, values)
    as drawn, read back from the figure.
    """
    if not histories:
        raise UsageError("no runs to draw: pass at least one run's per-epoch records")
    per_token = any("tokens" in record for records in histories.values() for record in records)
    unit = "token" if per_token else "sample"
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for field, _, _ in CURVES:
        for run, records in histories.items():
            points = [(float(record.get("epoch", position + 1)), float(record[field]))
                      for position, record in enumerate(records) if _finite(record.get(field))]
            if points:
                series.setdefault(field, {})[run] = ([x for x, _ in points], [y for _, y in points])
    if not series:
        raise UsageError(f"nothing to draw: the records of {', '.join(histories)} hold none of "
                         f"{', '.join(field for field, _, _ in CURVES)}")
    figure = _figure()
    panels = [curve for curve in CURVES if curve[0] in series]
    shape = (1, len(panels)) if len(panels) <= 2 else ((2, 2) if len(panels) <= 4 else (2, 3))
    axes = np.atleast_1d(figure.subplots(*shape)).reshape(-1)
    colours = {run: f"C{position % 10}" for position, run in enumerate(histories)}
    drawn: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    from matplotlib.ticker import MaxNLocator

    for ax, (field, label, panel_title) in zip(axes, panels, strict=False):
        for run, (xs, ys) in series[field].items():
            (line,) = ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.8, color=colours[run], label=run)
            x, y = line.get_data()
            drawn.setdefault(field, {})[run] = (np.asarray(x, dtype=float), np.asarray(y, dtype=float))
        ax.set(xlabel="epoch", ylabel=label.format(unit=unit), title=panel_title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if field == "seconds":
            ax.set_ylim(bottom=0)  # times compared as ratios: from zero
        if len(histories) > 1:
            ax.legend(loc="best", framealpha=0.9)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    figure.suptitle(title or f"Learning curves: {', '.join(histories)}", fontsize=13)
    _save(figure, out)
    return drawn
