"""Resolve a dataset spec to a torch Dataset; the built-in data sets; the dataset fingerprint.

A spec is either the name of a built-in data set (``digits``), ``hf:PATH`` (a Hugging Face ``datasets``
directory or data file, see ``hf_datasets.py``) or ``module:callable`` returning a
map-style dataset (``__len__`` and ``__getitem__``) whose items are ``(input, label)`` or
``input`` alone, inputs being tensors or dicts of tensors (a dict is passed to the model as keyword
arguments). ``--dataset-kwargs`` are passed to the callable (or the built-in). A ``datasets.Dataset``
a callable returns in Python or numpy format is read as ``hf:PATH`` reads its rows (lists become tensors).

Built-in ``digits``: scikit-learn's copy of the UCI optical handwritten digits (1,797 8x8 images,
10 classes, shipped inside scikit-learn, so nothing is downloaded). Inputs are float32 tensors
``(1, 8, 8)`` scaled to [0, 1]; labels are ints. The split is fixed: a permutation of all indices
by ``numpy.random.default_rng(0)``; the first 1,437 (80%) are ``train``, the other 360 ``test``.

The fingerprint names content, not spelling: it hashes the dataset's *identity* (the callable as
:func:`~logit_cache.specs.callable_identity` names it, the kwargs with defaults filled by
:func:`~logit_cache.specs.bound_kwargs`; a built-in name and ``tokens:PATH`` are their own spec), so
``pkg.mod:fn``, ``pkg/mod.py:fn`` and the defaults spelled out give one fingerprint. The manifest shows
the spec and kwargs as typed and records the identity (``dataset.identity``) when it differs, so the
fingerprint can be recomputed without resolving the spec again; a manifest without one (older caches,
or typed as the identity) was fingerprinted from the spec and kwargs it shows. A dataset that carries its
own identity (``logit_cache_identity``: ``hf:PATH``, named by datasets' fingerprint) is compared by that one.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DatasetError, SpecError
from ..format.identity import dataset_fingerprint
from ..specs import bound_kwargs, callable_identity, resolve_callable
from .hf_datasets import HF_DATASET_PREFIX, HF_KWARGS, adapt_hf_dataset, is_hf_dataset_spec, load_hf_dataset
from .replay import FirstViews
from .tokens import ByteText, TokenWindows, is_token_item, token_item

if TYPE_CHECKING:
    from ..format.manifest import Manifest

DIGITS_SPLIT_SEED = 0
DIGITS_TRAIN_SIZE = 1437


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits with the fixed split described in the module docstring.

    ``augment=True`` applies random augmentation to each item, drawing from all three global
    generators (so ``dump --views`` can replay it): a shift of up to one pixel in each direction
    (torch), Gaussian noise of std 0.1 (numpy) and a horizontal flip with probability 0.2 (Python's
    ``random``).
    """

    def __init__(self, split: str = "train", augment: bool = False) -> None:
        if split not in ("train", "test", "all"):
            raise DatasetError(f"digits: split {split!r} is not one of 'train', 'test', 'all'")
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise DatasetError(
                "the built-in 'digits' data set needs scikit-learn: pip install 'logit-cache[digits]' (or scikit-learn)"
            ) from exc
        bunch = load_digits()
        order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(bunch.target))
        chosen = {"train": order[:DIGITS_TRAIN_SIZE], "test": order[DIGITS_TRAIN_SIZE:], "all": np.arange(len(order))}[split]
        self.split = split
        self.augment = bool(augment)
        self.images = torch.from_numpy((bunch.data[chosen] / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
        self.labels = torch.from_numpy(bunch.target[chosen].astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment:
            shift = torch.randint(-1, 2, (2,))
            image = torch.roll(image, shifts=(int(shift[0]), int(shift[1])), dims=(1, 2))
            image = image + torch.from_numpy(np.random.normal(0.0, 0.1, size=image.shape).astype(np.float32))
            if random.random() < 0.2:
                image = image.flip(2)
        return image, int(self.labels[index])


BUILTIN_DATASETS = {"digits": DigitsDataset, "text": ByteText}
#: ``tokens:PATH.npy``: a flat token-id array cut into windows (tokens.TokenWindows).
TOKENS_PREFIX = "tokens:"


@dataclass(frozen=True)
class ResolvedDataset:
    """A dataset with what the manifest records about it and the shape of its items."""

    dataset: Any
    spec: str
    kwargs: dict[str, Any]
    has_labels: bool
    #: Items are token sequences (a language model's data): one cache row per real token.
    per_token: bool = False
    #: What the fingerprint hashes instead of the spelling: {"spec": ..., "kwargs": ...} (None: spec and kwargs).
    identity: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def fingerprint(self, seed: int | None = None) -> str:
        identity = self.identity or {"spec": self.spec, "kwargs": self.kwargs}
        return fingerprint_as_dumped(self.dataset, identity["spec"], identity["kwargs"], seed)

    def manifest_entry(self, fingerprint: str) -> dict[str, Any]:
        entry = {"spec": self.spec, "kwargs": self.kwargs, "length": len(self.dataset), "fingerprint": fingerprint}
        if self.identity is not None and self.identity != {"spec": self.spec, "kwargs": self.kwargs}:
            entry["identity"] = self.identity
        return entry


def fingerprint_as_dumped(dataset: Any, spec: str, kwargs: Mapping[str, Any], seed: int | None) -> str:
    """The dataset fingerprint a dump records: with a replay ``seed``, over the items as view 0
    replays them (a randomly augmenting dataset has no fixed items otherwise).

    What a dump writes and what training and ``verify`` compare it with; the latter pass the spec,
    kwargs and seed recorded in the manifest (:func:`recorded_fingerprint`).
    """
    return dataset_fingerprint(FirstViews(dataset, seed) if seed is not None else dataset, spec, kwargs)


def recorded_fingerprint(dataset: Any, manifest: Manifest) -> str:
    """``dataset``'s fingerprint computed as the dump of ``manifest`` computed it (its spec, kwargs and
    seed), to compare with ``manifest.dataset["fingerprint"]``."""
    recorded = manifest.dataset
    seed = None if manifest.per_token else manifest.seed  # per token, the seed is the sampling seed: no replayed inputs
    # a dataset that names its own identity (hf:PATH: datasets' fingerprint) is compared by it; else the recorded one
    identity = getattr(dataset, "logit_cache_identity", None) or recorded.get("identity") or recorded  # module docstring
    return fingerprint_as_dumped(dataset, str(identity.get("spec")), dict(identity.get("kwargs") or {}), seed)


def resolve_dataset(spec: str, kwargs: Mapping[str, Any] | None = None) -> ResolvedDataset:
    """Build the dataset a spec names and check that it is usable (length, first item)."""
    kwargs = dict(kwargs or {})
    if spec in BUILTIN_DATASETS:
        factory: Any = BUILTIN_DATASETS[spec]
        identity = {"spec": spec, "kwargs": bound_kwargs(factory, kwargs)}
    elif spec.startswith(TOKENS_PREFIX):
        path = spec[len(TOKENS_PREFIX):]
        factory = lambda **kw: TokenWindows(path, **kw)  # noqa: E731
        bound = bound_kwargs(TokenWindows, {"ids": path, **kwargs})
        identity = {"spec": spec, "kwargs": {name: value for name, value in bound.items() if name != "ids"}}
    elif is_hf_dataset_spec(spec):
        path = spec[len(HF_DATASET_PREFIX):]
        unknown = sorted(set(kwargs) - set(HF_KWARGS))
        if unknown:
            raise DatasetError(f"--dataset {spec!r}: unknown dataset kwargs {', '.join(unknown)}; hf:PATH takes {', '.join(HF_KWARGS)}")
        factory = lambda **kw: load_hf_dataset(path, **kw)  # noqa: E731
        identity = None  # the dataset's own (hf_datasets.py): datasets' fingerprint, known once it is read
    elif ":" in spec:
        try:
            factory = resolve_callable(spec, "--dataset")
        except SpecError as exc:
            raise DatasetError(str(exc)) from exc
        identity = {"spec": callable_identity(factory, spec), "kwargs": bound_kwargs(factory, kwargs)}
    else:
        raise DatasetError(
            f"--dataset {spec!r} is neither a built-in data set ({', '.join(BUILTIN_DATASETS)}), tokens:PATH.npy, hf:PATH (a "
            f"Hugging Face datasets directory or data file), nor MODULE:CALLABLE"
        )
    try:
        dataset = factory(**kwargs)
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"--dataset {spec!r} with kwargs {kwargs} failed to build: {exc!r}") from exc
    dataset = adapt_hf_dataset(dataset, spec)  # a datasets.Dataset in Python format: rows as tensors
    identity = identity or getattr(dataset, "logit_cache_identity", None)
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise DatasetError(
            f"--dataset {spec!r} returned a {type(dataset).__name__}, not a map-style dataset "
            f"(it needs __len__ and __getitem__; iterable datasets cannot be aligned by index)"
        )
    length = len(dataset)
    if length == 0:
        raise DatasetError(f"--dataset {spec!r} is empty: nothing to cache")
    try:
        first = dataset[0]
    except Exception as exc:
        raise DatasetError(f"--dataset {spec!r}: reading item 0 failed: {exc!r}") from exc
    if is_token_item(first):
        parsed = token_item(first, f"--dataset {spec!r} item 0")
        if len(parsed.ids) == 0:
            raise DatasetError(f"--dataset {spec!r}: item 0 has no tokens")
        # labels: the ids, at worst
        return ResolvedDataset(dataset, spec, kwargs, has_labels=True, per_token=True, identity=identity)
    return ResolvedDataset(dataset, spec, kwargs, has_labels=_split_item(first, spec)[1] is not None, identity=identity)


def _split_item(item: Any, spec: str) -> tuple[Any, Any]:
    """``(input, label)`` of an item; label is None for input-only items."""
    if isinstance(item, (tuple, list)):
        if len(item) == 2:
            inputs, label = item
            if not _is_class_label(label):
                raise DatasetError(
                    f"--dataset {spec!r}: item 0 is a pair whose second element ({type(label).__name__}"
                    f"{tuple(label.shape) if isinstance(label, torch.Tensor) else ''}) is not an integer class label"
                )
            return inputs, label
        if len(item) == 1:
            return item[0], None
        raise DatasetError(f"--dataset {spec!r}: items must be (input, label) or input alone, got a {len(item)}-tuple")
    return item, None


def _is_class_label(label: Any) -> bool:
    """An int, or a 0-d integer tensor/array: what per-sample classification labels are."""
    if isinstance(label, bool):
        return False
    if isinstance(label, (int, np.integer)):
        return True
    if isinstance(label, torch.Tensor):
        return label.ndim == 0 and not label.dtype.is_floating_point and label.dtype != torch.bool
    if isinstance(label, np.ndarray):
        return label.ndim == 0 and np.issubdtype(label.dtype, np.integer)
    return False


def split_batch(batch: Any, has_labels: bool) -> tuple[Any, Any]:
    """Split a collated batch into (inputs, labels or None)."""
    if has_labels:
        inputs, labels = batch
        return inputs, labels
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return batch[0], None
    return batch, None
