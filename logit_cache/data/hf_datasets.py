"""Hugging Face ``datasets`` as dump and training data: ``--dataset hf:PATH``, and datasets.Dataset from callables.

PATH is one of

* a ``save_to_disk`` directory of a ``Dataset``, or of a ``DatasetDict`` with ``{"split": NAME}`` in the
  dataset kwargs (without one the error lists the splits);
* a data file (``.json``, ``.jsonl``, ``.parquet``, ``.csv``, ``.txt``) or a folder of them, all of one
  kind, read in sorted path order with ``datasets.load_dataset(<builder>, data_files=...)`` (its one split).

Rows become the items the rest of the package reads, whatever format the dataset was saved in (Python
lists, numpy or torch): values become tensors as datasets' torch formatter makes them (integers int64,
floats float32), here where the dataset is adapted, so nobody needs ``set_format("torch")`` first.

* Rows with an ``input_ids`` column are token sequences (a per-token cache): the item is a dict of
  ``input_ids`` and, when the rows have them, ``attention_mask`` and ``labels``; other columns are left out.
* ``text_column``: the column is tokenised (below) into windows of token ids, a per-token cache.
* Otherwise the rows are per-sample: ``(input, label)``, the label from ``label_column`` (default:
  ``label`` or ``labels`` when there is such a column; none: items are the input alone), the input from
  ``columns`` (default: every other column), one column as a tensor, several as a dict (the model's
  keyword arguments).

Windowing of a text column (``text_column``, ``seq_len`` default 128, ``stride`` default ``seq_len``,
``tokenizer`` a local tokenizer directory): each text is tokenised without the tokenizer's own special
tokens and followed by its EOS token (nothing when it has none); the texts, in row order, make one
token stream, cut into windows of ``seq_len`` tokens every ``stride`` tokens as ``tokens:PATH.npy`` is
(:class:`~logit_cache.data.tokens.TokenWindows`): the last window may be shorter, one under 2 tokens is
dropped. Windows run across texts (the EOS marks where one ends), so nothing is padded and every token
is trained on. A column of conversations (lists of ``{"role", "content"}``, e.g. ``messages``) is first
rendered with the tokenizer's chat template (its text carries the template's own markers).

Identity (what the dataset fingerprint hashes instead of the spelling; see ``datasets.py``): PATH enters
as datasets' own fingerprint of the split read (``_fingerprint`` of a ``save_to_disk`` directory: it
follows every datasets transform, and not the path) or, for data files, as the SHA-256 of their bytes in
the order read (datasets' fingerprint of ``load_dataset`` hashes the path and modification time, which
would refuse a copied or touched file); the tokenizer as the SHA-256 of its files; the other kwargs as
given, with their defaults. The adapted dataset carries this identity (``logit_cache_identity``), and
training compares with it, so a dataset changed anywhere is refused, not only at the sampled items.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DatasetError
from ..format.identity import file_sha256
from .tokens import TokenWindows

HF_DATASET_PREFIX = "hf:"
#: Data-file suffixes and the datasets builder that reads them.
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
#: The columns a token item keeps.
TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels")
DEFAULT_SEQ_LEN = 128
#: The dataset kwargs ``hf:PATH`` takes (the CLI's --text-column, --seq-len and --tokenizer are three of them).
HF_KWARGS = ("split", "text_column", "seq_len", "stride", "tokenizer", "columns", "label_column")
#: The tokenizer files its identity hashes (those present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                   "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja", "chat_template.json")
_BATCH = 1000


def is_hf_dataset_spec(spec: str) -> bool:
    return isinstance(spec, str) and spec.startswith(HF_DATASET_PREFIX)


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise DatasetError("--dataset hf:PATH needs the datasets package: pip install datasets") from exc
    return datasets


def load_hf_dataset(path: str, split: str | None = None, text_column: str | None = None, seq_len: int | None = None,
                    stride: int | None = None, tokenizer: str | None = None, columns: Sequence[str] | None = None,
                    label_column: str | None = None) -> HFRows | HFTextWindows:
    """The dataset ``hf:PATH`` names, adapted (module docstring), with its identity attached."""
    where = f"--dataset {HF_DATASET_PREFIX}{path}"
    if text_column is None and (seq_len is not None or stride is not None or tokenizer is not None):
        raise DatasetError(f"{where}: seq_len, stride and tokenizer tokenise a text column; name it with text_column "
                           f"(CLI: --text-column NAME)")
    data, source = _read(Path(path).expanduser(), split, where)
    identity = {"spec": HF_DATASET_PREFIX.rstrip(":"), "kwargs": {
        "source": source, "split": split, "text_column": text_column, "seq_len": seq_len, "stride": stride,
        "tokenizer": None if tokenizer is None else tokenizer_sha256(tokenizer, where),
        "columns": None if columns is None else list(columns), "label_column": label_column}}
    if text_column is not None:
        if columns is not None or label_column is not None:
            raise DatasetError(f"{where}: columns and label_column are for per-sample rows, not with text_column")
        if tokenizer is None:
            raise DatasetError(f"{where}: tokenising text_column {text_column!r} needs a tokenizer: --tokenizer DIR (a "
                               f"save_pretrained directory; dump defaults to an hf:DIR teacher's) or the tokenizer kwarg")
        ids = tokenize_column(data, text_column, load_tokenizer(tokenizer, where), where)
        return HFTextWindows(ids, DEFAULT_SEQ_LEN if seq_len is None else int(seq_len), stride, where, identity)
    return HFRows(data, where, columns=columns, label_column=label_column, identity=identity)


def _read(path: Path, split: str | None, where: str) -> tuple[Any, str]:
    """The split's ``datasets.Dataset`` and its source identity (module docstring)."""
    if not path.exists():
        raise DatasetError(f"{where}: no such file or directory (expected a save_to_disk directory or a data file "
                           f"{'/'.join(DATA_FILE_BUILDERS)})")
    datasets = _datasets()
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DatasetError(f"{where}: datasets.load_from_disk failed: {type(exc).__name__}: {exc}") from exc
        if isinstance(loaded, datasets.DatasetDict):
            if split is None:
                raise DatasetError(f"{where} is a DatasetDict with splits {', '.join(loaded)}: choose one with "
                                   f"--dataset-kwargs '{{\"split\": \"{next(iter(loaded))}\"}}'")
            if split not in loaded:
                raise DatasetError(f"{where}: no split {split!r}; the DatasetDict has {', '.join(loaded)}")
            loaded = loaded[split]
        elif split is not None:
            raise DatasetError(f"{where} is a single Dataset, not a DatasetDict: it has no split {split!r}; drop the split kwarg")
        return loaded, f"datasets:{loaded._fingerprint}"
    files = _data_files(path, where)
    builders = {DATA_FILE_BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise DatasetError(f"{where}: the folder mixes data files of kinds {', '.join(sorted(builders))}; keep one kind per folder")
    if split not in (None, "train"):
        raise DatasetError(f"{where}: data files make one split, 'train'; drop the split kwarg (got {split!r})")
    try:
        loaded = datasets.load_dataset(builders.pop(), data_files=[str(f) for f in files], split="train")
    except Exception as exc:
        raise DatasetError(f"{where}: datasets.load_dataset failed: {type(exc).__name__}: {exc}") from exc
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file_sha256(file)};".encode())
    return loaded, f"files:{digest.hexdigest()}"


def _data_files(path: Path, where: str) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in DATA_FILE_BUILDERS:
            raise DatasetError(f"{where}: {path.suffix or 'no suffix'} is not a data file datasets reads here "
                               f"({', '.join(DATA_FILE_BUILDERS)})")
        return [path]
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in DATA_FILE_BUILDERS
                   and not any(part.startswith(".") for part in f.relative_to(path).parts))
    if not files:
        raise DatasetError(f"{where}: the folder is neither a save_to_disk directory (state.json or dataset_dict.json) nor "
                           f"holds data files ({', '.join(DATA_FILE_BUILDERS)})")
    return files


def tokenizer_sha256(directory: str, where: str) -> str:
    """SHA-256 over the tokenizer files present (:data:`TOKENIZER_FILES`): equal tokenizers agree wherever they lie."""
    folder = Path(directory).expanduser()
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not present:
        raise DatasetError(f"{where}: tokenizer {directory!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                           f"pass a directory written by tokenizer.save_pretrained")
    digest = hashlib.sha256()
    for name in present:
        digest.update(f"{name}\0{file_sha256(folder / name)};".encode())
    return digest.hexdigest()


def load_tokenizer(directory: str, where: str) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise DatasetError(f"{where}: tokenising a text column needs transformers: pip install 'logit-cache[hf]'") from exc
    try:
        return transformers.AutoTokenizer.from_pretrained(str(Path(directory).expanduser()), local_files_only=True)
    except Exception as exc:
        raise DatasetError(f"{where}: cannot load the tokenizer in {directory!r}: {type(exc).__name__}: {exc}") from exc


def tokenize_column(data: Any, column: str, tokenizer: Any, where: str) -> np.ndarray:
    """The token stream of ``column`` (module docstring: texts tokenised in row order, each followed by EOS)."""
    if column not in data.column_names:
        raise DatasetError(f"{where}: no column {column!r} to tokenise; the columns are {', '.join(data.column_names)}")
    plain = data.with_format(None)
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    pieces: list[np.ndarray] = []
    for start in range(0, len(plain), _BATCH):
        values = plain[start : start + _BATCH][column]
        texts = [_as_text(value, tokenizer, f"{where}: row {start + j} of column {column!r}") for j, value in enumerate(values)]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(list(ids) + eos, dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def _as_text(value: Any, tokenizer: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(turn, Mapping) for turn in value):
        if not getattr(tokenizer, "chat_template", None):
            raise DatasetError(f"{where} holds conversations, but the tokenizer has no chat template to render them")
        return tokenizer.apply_chat_template(value, tokenize=False)
    raise DatasetError(f"{where} is a {type(value).__name__}, not text (a string) or a conversation (a list of "
                       f"{{'role', 'content'}} dicts)")


class HFTextWindows(TokenWindows):
    """Windows of a tokenised text column (module docstring), with its identity."""

    def __init__(self, ids: np.ndarray, seq_len: int, stride: int | None, where: str, identity: dict[str, Any]) -> None:
        super().__init__(ids, seq_len, stride, where=where)
        self.logit_cache_identity = identity


class HFRows(torch.utils.data.Dataset):
    """A ``datasets.Dataset``'s rows as items: token dicts or ``(input, label)`` (module docstring).

    ``identity`` is None for a Dataset a MODULE:CALLABLE returned: its callable names it.
    """

    def __init__(self, data: Any, where: str, columns: Sequence[str] | None = None, label_column: str | None = None,
                 identity: dict[str, Any] | None = None) -> None:
        names = list(data.column_names)
        self.data, self.where, self.logit_cache_identity = data.with_format("torch"), where, identity
        self.per_token = "input_ids" in names
        for name in [*(columns or []), *([label_column] if label_column else [])]:
            if name not in names:
                raise DatasetError(f"{where}: no column {name!r}; the columns are {', '.join(names)}")
        if self.per_token:
            self.label, self.inputs = None, [name for name in TOKEN_COLUMNS if name in names]
        else:
            self.label = label_column or next((name for name in ("label", "labels") if name in names), None)
            self.inputs = list(columns) if columns else [name for name in names if name != self.label]
            if not self.inputs:
                raise DatasetError(f"{where}: no input columns (the columns are {', '.join(names)})")
            if len(self.data):
                self._check_inputs(self.data[0])

    def _check_inputs(self, row: Mapping[str, Any]) -> None:
        for name in self.inputs:
            if not isinstance(row[name], torch.Tensor):
                what = "text" if isinstance(row[name], str) else f"a {type(row[name]).__name__}"
                raise DatasetError(
                    f"{self.where}: column {name!r} holds {what}, not numbers a model takes: tokenise a text column with "
                    f"--text-column {name} --tokenizer DIR, or choose the input columns with --dataset-kwargs "
                    f"'{{\"columns\": [...]}}'")

    def __len__(self) -> int:
        return len(self.data)

    def _item(self, row: Mapping[str, Any]) -> Any:
        if self.per_token:
            return {name: row[name] for name in self.inputs}
        inputs = row[self.inputs[0]] if len(self.inputs) == 1 else {name: row[name] for name in self.inputs}
        if self.label is None:
            return inputs
        label = row[self.label]
        whole = isinstance(label, torch.Tensor) and label.ndim == 0 and not label.dtype.is_floating_point
        return inputs, int(label) if whole else label

    def __getitem__(self, index: int) -> Any:
        return self._item(self.data[int(index)])

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """A batch read from the table at once (datasets' own batched access)."""
        return [self._item(row) for row in self.data.__getitems__([int(i) for i in indices])]

    def token_lengths(self) -> np.ndarray:
        """Real tokens per row (the attention mask's ones, else the ids), read a batch of rows at a time."""
        if not self.per_token:
            raise DatasetError(f"{self.where}: the rows are not token sequences (no input_ids column)")
        column = "attention_mask" if "attention_mask" in self.inputs else "input_ids"
        plain = self.data.with_format(None)
        lengths: list[int] = []
        for start in range(0, len(plain), _BATCH):
            values = plain[start : start + _BATCH][column]
            lengths.extend(int(sum(v)) if column == "attention_mask" else len(v) for v in values)
        return np.asarray(lengths, dtype=np.int64)


def adapt_hf_dataset(dataset: Any, spec: str) -> Any:
    """A ``datasets.Dataset`` a MODULE:CALLABLE returned, its rows as items (as ``hf:PATH`` reads them) unless it
    is already in torch format (kept as it is: caches dumped from it were fingerprinted over its own rows)."""
    datasets = sys.modules.get("datasets")  # a datasets.Dataset means the package is imported: no import otherwise
    if datasets is None or not isinstance(dataset, datasets.Dataset) or dataset.format.get("type") == "torch":
        return dataset
    return HFRows(dataset, f"--dataset {spec!r}")


def with_teacher_tokenizer(dataset: str, kwargs: Mapping[str, Any] | None, teacher: str | None) -> dict[str, Any]:
    """``kwargs`` of an ``hf:PATH`` dataset whose text column has no tokenizer, with an ``hf:DIR`` teacher's
    directory as the tokenizer (the model's own tokenizer is the one its logits are about); else as given."""
    kwargs = dict(kwargs or {})
    teacher_dir = teacher[len(HF_DATASET_PREFIX):] if isinstance(teacher, str) and teacher.startswith(HF_DATASET_PREFIX) else ""
    if is_hf_dataset_spec(dataset) and kwargs.get("text_column") is not None and kwargs.get("tokenizer") is None and teacher_dir:
        kwargs["tokenizer"] = teacher_dir
    return kwargs
