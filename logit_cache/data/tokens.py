"""Token-sequence data for language-model caches: items, lengths, padding, the built-in token data sets.

A per-token dataset's item is one sequence of token ids, in one of three shapes:

* ``ids``: a 1-D integer tensor (or numpy array);
* ``(ids, labels)``: labels a 1-D integer sequence of the same length. Hugging Face's convention:
  the labels *are* the ids (the loss shifts them: position ``t`` predicts ``labels[t + 1]``), with
  ``-100`` where no loss is wanted;
* a dict with ``input_ids`` and optionally ``attention_mask`` (ones, then zeros for padding the
  dataset added itself: right padding only) and ``labels``.

A sequence's real tokens are its ids where the attention mask is 1 (all of them without a mask).
Caches store one row per real token and never store padding: ``offsets`` maps sequences to rows.
Batches are right-padded here (ids with 0, labels with -100), which a causal model needs no mask
for: a real token never attends to the padding after it.

Built-in data sets (``--dataset``):

* ``tokens:PATH.npy``: a flat array of token ids cut into windows of ``seq_len`` (default 128)
  tokens starting every ``stride`` tokens (default ``seq_len``: windows that do not overlap; a
  smaller stride overlaps them, a larger one skips tokens). The last window may be shorter; one of
  fewer than 2 tokens is dropped (it predicts nothing).
* ``text``: byte-level windows (ids 0..255) of Python's own documentation, the pydoc topic texts in
  the standard library's ``pydoc_data.topics`` (about 0.8 MB of English prose and code examples;
  Python Software Foundation License, the licence of CPython itself). Nothing is downloaded. The
  first 90% of the bytes are ``split="train"``, the last 10% ``"test"`` (``"all"``: everything).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DatasetError, DatasetMismatchError
from ..targets.batch import Targets

#: Label value that means "no loss here" (Hugging Face's and torch's ``ignore_index``).
IGNORE_INDEX = -100
TEXT_TRAIN_FRACTION = 0.9
TEXT_VOCAB = 256


def _is_id_vector(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.ndim == 1 and not value.dtype.is_floating_point and value.dtype != torch.bool
    if isinstance(value, np.ndarray):
        return value.ndim == 1 and np.issubdtype(value.dtype, np.integer)
    return False


def is_token_item(item: Any) -> bool:
    """Whether ``item`` is a token sequence (module docstring), as opposed to a per-sample input."""
    if isinstance(item, Mapping):
        return "input_ids" in item and _is_id_vector(item["input_ids"])
    if isinstance(item, (tuple, list)):
        if len(item) == 1:
            return _is_id_vector(item[0])
        return len(item) == 2 and _is_id_vector(item[0]) and _is_id_vector(item[1])
    return _is_id_vector(item)


@dataclass(frozen=True)
class TokenItem:
    """One sequence's real tokens: ids (L,), labels (L,) or None, and whether it came as a dict."""

    ids: torch.Tensor
    labels: torch.Tensor | None
    as_dict: bool


def _long(value: Any) -> torch.Tensor:
    return (value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))).long()


def token_item(item: Any, where: str = "item") -> TokenItem:
    """Parse an item into its real tokens (padding the dataset added is cut off here)."""
    if isinstance(item, Mapping):
        ids, labels = _long(item["input_ids"]), item.get("labels")
        mask = item.get("attention_mask")
        if mask is not None:
            mask = _long(mask)
            length = int(mask.sum())
            if mask.shape != ids.shape or bool((mask[:length] != 1).any()) or bool(mask[length:].any()):
                raise DatasetError(
                    f"{where}: attention_mask must be ones then zeros (right padding) of the ids' length; got {mask.tolist()[:32]}"
                )
            ids = ids[:length]
            labels = None if labels is None else _long(labels)[:length]
        return TokenItem(ids, None if labels is None else _long(labels), True)
    if isinstance(item, (tuple, list)):
        ids = _long(item[0])
        labels = _long(item[1]) if len(item) == 2 else None
        if labels is not None and labels.shape != ids.shape:
            raise DatasetError(f"{where}: labels have shape {tuple(labels.shape)} but ids {tuple(ids.shape)}; they must match")
        return TokenItem(ids, labels, False)
    return TokenItem(_long(item), None, False)


def token_lengths(dataset: Any) -> np.ndarray:
    """Real tokens per item (int64). Datasets may say it themselves with ``token_lengths()``;
    otherwise every item is read once (the dump plans its shards from these counts)."""
    own = getattr(dataset, "token_lengths", None)
    if callable(own):
        try:
            lengths = np.asarray(own(), dtype=np.int64)
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(f"the dataset's token_lengths() failed: {type(exc).__name__}: {exc}") from exc
        if lengths.shape != (len(dataset),):
            raise DatasetError(f"token_lengths() returned shape {lengths.shape}, expected ({len(dataset)},)")
        return lengths
    return np.fromiter((len(token_item(_item(dataset, i), f"item {i}").ids) for i in range(len(dataset))), dtype=np.int64,
                       count=len(dataset))


def _item(dataset: Any, index: int) -> Any:
    """``dataset[index]``, or a DatasetError naming the index (the dump reads every item to plan its shards)."""
    try:
        return dataset[index]
    except DatasetError:
        raise
    except Exception as exc:
        fix = (f"its len() is {len(dataset)}, so every index below that must give an item: make __len__ count only the "
               f"items __getitem__ can return" if isinstance(exc, IndexError) else "fix the dataset")
        raise DatasetError(f"reading dataset item {index} (to count its tokens) failed with {type(exc).__name__}: {exc}; {fix}") from exc


@dataclass
class TokenBatch:
    """Right-padded sequences: ``inputs`` (B, T) ids or a dict with ``input_ids`` and ``attention_mask``,
    ``labels`` (B, T) with -100 on padding (the ids where the items gave no labels), ``lengths`` (B,)."""

    inputs: torch.Tensor | dict[str, torch.Tensor]
    labels: torch.Tensor
    lengths: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"] if isinstance(self.inputs, dict) else self.inputs


def collate_tokens(items: Sequence[Any]) -> TokenBatch:
    """Pad a list of token items to the longest (ids with 0, labels with -100)."""
    parsed = [token_item(item) for item in items]
    lengths = torch.tensor([len(p.ids) for p in parsed], dtype=torch.int64)
    width = int(lengths.max()) if len(parsed) else 0
    ids = torch.zeros(len(parsed), width, dtype=torch.int64)
    labels = torch.full((len(parsed), width), IGNORE_INDEX, dtype=torch.int64)
    for row, item in enumerate(parsed):
        ids[row, : len(item.ids)] = item.ids
        labels[row, : len(item.ids)] = item.ids if item.labels is None else item.labels
    if parsed and parsed[0].as_dict:
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return TokenBatch({"input_ids": ids, "attention_mask": mask}, labels, lengths)
    return TokenBatch(ids, labels, lengths)


def next_token_mask(labels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions ``t`` that predict a label, i.e. ``t + 1 < length`` and ``labels[t + 1] != -100``.

    Both the ground-truth loss and the KD loss use it: the teacher's row of the last token (and of
    tokens before an ignored label) is stored but not trained on.
    """
    width = labels.shape[1]
    position = torch.arange(width, device=labels.device)[None, :]
    return (position + 1 < lengths.to(labels.device)[:, None]) & (shifted_labels(labels) != IGNORE_INDEX)


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels moved one step left: what position ``t`` predicts; -100 at the end."""
    following = torch.full_like(labels, IGNORE_INDEX)
    following[:, :-1] = labels[:, 1:]
    return following


# -- built-in data sets ---------------------------------------------------------------------------------


def slice_sequence(target: Targets, j: int) -> Targets:
    """Sequence ``j`` of a flat per-token Targets (with ``lengths``), as a one-sequence Targets (views, no copy)."""
    ends = torch.cumsum(target.lengths, 0)
    stop = int(ends[j])
    start = stop - int(target.lengths[j])
    cut = {name: t[start:stop] for name, t in target.tensors().items() if name != "lengths"}
    return replace(target, **cut, lengths=target.lengths[j : j + 1])


def concat_sequences(parts: Sequence[Targets]) -> Targets:
    """Per-token Targets of single sequences joined into one flat batch (the inverse of :func:`slice_sequence`)."""
    first = parts[0]
    tensors = {name: torch.cat([getattr(p, name) for p in parts]) for name in first.tensors()}
    return replace(first, **tensors)


def collate_token_targets(items: Sequence[Any], targets: list[Targets]) -> tuple[Any, torch.Tensor, list[Targets]]:
    """A per-token batch from a cache: ``(inputs, labels, targets)``, the items right-padded
    (:func:`collate_tokens`), each cache's flat Targets over the real tokens, with ``lengths`` that must
    agree with the items' own (else :class:`DatasetMismatchError`: the dataset is not the cache's)."""
    padded = collate_tokens(items)
    for target in targets:
        if not torch.equal(target.lengths.to(torch.int64), padded.lengths):
            j = int((target.lengths.to(torch.int64) != padded.lengths).nonzero()[0, 0])
            raise DatasetMismatchError(
                f"sequence {j} of the batch has {int(padded.lengths[j])} tokens but the cache holds {int(target.lengths[j])} "
                f"rows for it: the dataset is not the one the cache was dumped from"
            )
    return padded.inputs, padded.labels, targets


def _window_starts(num_tokens: int, seq_len: int, stride: int) -> np.ndarray:
    starts = np.arange(0, max(0, num_tokens - 1), stride, dtype=np.int64)
    return starts[np.minimum(starts + seq_len, num_tokens) - starts >= 2]


class TokenWindows(torch.utils.data.Dataset):
    """Windows of a flat id array (module docstring): item ``i`` is ``ids[i * stride : i * stride + seq_len]``."""

    def __init__(self, ids: np.ndarray | str | Path, seq_len: int = 128, stride: int | None = None, where: str = "tokens") -> None:
        if isinstance(ids, (str, Path)):
            path = Path(ids)
            if not path.is_file():
                raise DatasetError(f"--dataset tokens:{path}: no such file (expected a .npy array of token ids)")
            try:
                ids = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DatasetError(f"--dataset tokens:{path}: cannot be read as a .npy array ({exc})") from exc
            where = f"tokens:{path}"
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise DatasetError(f"{where}: expected a 1-D integer array of token ids, got shape {ids.shape} dtype {ids.dtype}")
        if seq_len < 2:
            raise DatasetError(f"{where}: seq_len must be >= 2 (a window predicts its next tokens), got {seq_len}")
        stride = seq_len if stride is None else int(stride)
        if stride < 1:
            raise DatasetError(f"{where}: stride must be >= 1, got {stride}")
        self.ids, self.seq_len, self.stride = ids, int(seq_len), stride
        self.starts = _window_starts(len(ids), self.seq_len, stride)
        if len(self.starts) == 0:
            raise DatasetError(f"{where}: {len(ids)} tokens make no window of at least 2 tokens")

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> torch.Tensor:
        start = int(self.starts[index])
        # a copy (seq_len ids): a read-only memmap would give torch a non-writable array
        return torch.from_numpy(np.array(self.ids[start : start + self.seq_len], dtype=np.int64))

    def token_lengths(self) -> np.ndarray:
        return np.minimum(self.starts + self.seq_len, len(self.ids)) - self.starts


def builtin_text_bytes() -> bytes:
    """The ``text`` data set's source: Python's pydoc topic texts, in sorted topic order, as UTF-8."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8")


class ByteText(TokenWindows):
    """The built-in ``text`` data set: byte-level windows of Python's pydoc topics (module docstring)."""

    def __init__(self, split: str = "train", seq_len: int = 128, stride: int | None = None) -> None:
        if split not in ("train", "test", "all"):
            raise DatasetError(f"text: split {split!r} is not one of 'train', 'test', 'all'")
        data = np.frombuffer(builtin_text_bytes(), dtype=np.uint8)
        cut = int(len(data) * TEXT_TRAIN_FRACTION)
        part = {"train": data[:cut], "test": data[cut:], "all": data}[split]
        super().__init__(part, seq_len, stride, where=f"text (split {split})")
        self.split = split
