"""How the trainer reports an epoch: a bar on a terminal, a plain log line elsewhere, nothing when quiet.

On a terminal (stderr is a TTY) each epoch gets a tqdm bar, left on screen when the epoch ends, with
the running loss and the throughput (samples/s, tokens/s for a language model); its final state says
what the plain line would: the epoch's loss, its time and its eval metrics. Anywhere else (a log file,
a pipe, CI) the bar would be noise: the epoch is one log line, the same one as always. With ``quiet``
neither shows (the line is still logged, at DEBUG, for whoever asks for it).

The running loss is read back from the device at most every :data:`REFRESH_SECONDS` (reading a GPU
value stalls the GPU), so a bar costs nothing measurable per step.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import IO, Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

#: At most this often the bar reads the running loss back from the device and redraws.
REFRESH_SECONDS = 0.5


def terminal(quiet: bool) -> IO[str] | None:
    """Where the epoch bars go: stderr when it is a terminal and ``quiet`` is off, else None (plain lines)."""
    if quiet:
        return None
    stream = sys.stderr
    isatty = getattr(stream, "isatty", None)
    return stream if isatty is not None and isatty() else None


class TrainProgress:
    """A run's progress reports: ``with TrainProgress(...) as progress``, then :meth:`epoch` per epoch.

    While bars are drawn, the root logger's console lines go through ``tqdm.write`` (above the bar, not
    through it); on the way out (an error included) the open bar is closed, so a message that follows
    starts on a line of its own.
    """

    def __init__(self, epochs: int, unit: str, quiet: bool) -> None:
        self.epochs, self.unit = epochs, unit
        self.stream = terminal(quiet)
        self.log_level = logging.INFO if self.stream is None and not quiet else logging.DEBUG
        self.current: EpochReport | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> TrainProgress:
        consoles = [h for h in logging.root.handlers if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)]
        if self.stream is not None and consoles:
            self._stack.enter_context(logging_redirect_tqdm())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.current is not None and self.current.bar is not None:
            self.current.bar.close()
        self._stack.close()

    def epoch(self, epoch: int, steps: int) -> EpochReport:
        """The report of epoch ``epoch`` (from 1) of ``steps`` batches."""
        self.current = EpochReport(epoch, self.epochs, steps, self.unit, self.stream, self.log_level)
        return self.current


class EpochReport:
    """One epoch's progress: :meth:`step` after every batch, :meth:`finish` once its metrics are known.

    ``stream`` None means no bar (not a terminal, or quiet); ``log_level`` is the level of the plain line.
    """

    def __init__(self, epoch: int, epochs: int, steps: int, unit: str, stream: IO[str] | None, log_level: int) -> None:
        self.epoch, self.epochs, self.unit, self.log_level = epoch, epochs, unit, log_level
        self.started = time.perf_counter()
        self._shown = 0.0
        self._postfix = ""
        self.bar = None if stream is None else tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="batch", file=stream,
                                                    leave=True, dynamic_ncols=True, mininterval=REFRESH_SECONDS)

    def _text(self, loss: float, seen: int, seconds: float) -> str:
        return f"loss {loss:.4f}, {seen / max(seconds, 1e-9):,.0f} {self.unit}/s"

    def step(self, loss_sum: torch.Tensor, seen: int) -> None:
        """One batch done; ``loss_sum`` (on the device) over ``seen`` rows so far."""
        if self.bar is None:
            return
        now = time.perf_counter()
        if now - self._shown >= REFRESH_SECONDS or self.bar.n + 1 == self.bar.total:
            self._shown = now
            self._postfix = self._text(float(loss_sum) / max(1, seen), seen, now - self.started)
            self.bar.set_postfix_str(self._postfix, refresh=False)
        self.bar.update(1)

    def evaluating(self) -> None:
        """The training part is done; the evaluation runs (it may take a while on a large eval set)."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self._postfix}, evaluating..." if self._postfix else "evaluating...")

    def finish(self, record: dict[str, Any], metrics: str, seen: int, log: logging.Logger) -> None:
        """The epoch's end: the bar's last state (or the log line) says its loss, time and ``metrics``
        (``task.describe(record)``: ``, eval accuracy 0.9500, eval KL 0.0400``)."""
        if self.bar is not None:
            self.bar.set_postfix_str(self._text(record["train_loss"], seen, record["seconds"]) + metrics, refresh=False)
            self.bar.close()
        log.log(self.log_level, "epoch %d/%d: loss %.4f%s, %.2f s", self.epoch, self.epochs, record["train_loss"], metrics,
                record["seconds"])
