"""Click options shared by several commands, declared once; their choices come from the registries.

Backends from :data:`logit_cache.store.BACKENDS`, value dtypes from :data:`logit_cache.targets.VALUE_DTYPES`,
the kind a dump's flag chooses from the target kinds (``TargetKind.flag``), the cache root from
``$LOGIT_CACHE_ROOT`` through click's ``envvar`` (the help shows it).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..data.hf_datasets import is_hf_dataset_spec, with_teacher_tokenizer
from ..errors import LogitCacheError, UsageError
from ..format.naming import ROOT_ENV
from ..specs import parse_json_kwargs
from ..store import BACKENDS
from ..targets import DEFAULT_KIND, KINDS, VALUE_DTYPES
from .common import fail

F = TypeVar("F", bound=Callable[..., Any])

#: ``--format`` and ``--dtype`` choices, from the one list of each.
BACKEND_CHOICE = click.Choice(list(BACKENDS))
DTYPE_CHOICE = click.Choice(list(VALUE_DTYPES))


def _stack(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    """One decorator applying ``options`` in the order listed (as they appear in --help)."""

    def decorate(function: F) -> F:
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def _sentence(prefix: str, text: str) -> str:
    return prefix + text if prefix else text[0].upper() + text[1:]


def teacher_options(teacher_help: str, *, required: bool = False, with_teacher: bool = False) -> Callable[[F], F]:
    """``--teacher``, ``--arch``, ``--arch-kwargs`` and ``--trust-checkpoint``; with ``with_teacher`` the
    last three say they describe a --teacher (the commands where the teacher is optional)."""
    prefix = "With --teacher: " if with_teacher else ""
    return _stack([
        click.option("--teacher", "teacher", required=required, metavar="CKPT", help=teacher_help),
        click.option("--arch", metavar="MODULE:CALLABLE",
                     help=_sentence(prefix, "builds the teacher's architecture for a state_dict (as at dump time), e.g. "
                                    "torchvision.models:resnet18 or models.py:make_net. Imports MODULE and runs its code; the "
                                    "current directory is searched after installed packages.")),
        click.option("--arch-kwargs", metavar="JSON",
                     help=_sentence(prefix, "keyword arguments for --arch, as a JSON object, e.g. '{\"num_classes\": 10}'.")),
        click.option("--trust-checkpoint", is_flag=True,
                     help=_sentence(prefix, "allow loading a teacher file whose loading runs code from it: a pickled whole "
                                    "nn.Module, or a .pt2 archive with pickled parts, AOTInductor code or Python source "
                                    "(guards, shape expressions). Only for files you trust.")),
    ])


def target_options() -> Callable[[F], F]:
    """What a dump stores: ``--topk K``, ``--sample M`` (with ``--sample-temperature``) or ``--full``.
    Giving more than one is refused by the dump's own validation (one place for the library and the CLI)."""
    return _stack([
        click.option("--topk", "topk", type=int, metavar="K",
                     help="Store the K largest logits per row, their ids and the logsumexp of all logits."),
        click.option("--sample", "sample", type=int, metavar="M",
                     help="Random-sampling KD (per-token caches): draw M ids per token from the teacher's distribution with a "
                          "seeded generator and store the distinct ids with their counts (counts/M estimates the probabilities)."),
        click.option("--sample-temperature", type=float, default=1.0, show_default=True, metavar="TS",
                     help="With --sample: draw from softmax(logits/TS). TS != 1 also stores the drawn ids' logits, so training "
                          "corrects the draws by importance weights."),
        click.option("--full", "full", is_flag=True,
                     help="Store every logit (C values per row); the size is stated before the dump starts."),
    ])


def chosen_kind(topk: int | None, sample: int | None, full: bool) -> tuple[str, int | None, int | None]:
    """(mode, k, m) of the flags as given: the kind whose flag (:attr:`TargetKind.flag`) was given, the
    top-k kind when none was. Several flags are passed on whole, for the dump's validation to refuse
    with the flags' names (one place for the library and the CLI)."""
    by_flag = {kind.flag: name for name, kind in KINDS.items()}
    given = [by_flag[flag] for flag, on in (("--topk", topk is not None), ("--sample", sample is not None), ("--full", full)) if on]
    return (given[-1] if given else DEFAULT_KIND), topk, sample


def placement_options() -> Callable[[F], F]:
    """``--device-map``, ``--max-memory`` and ``--devices-per-rank``: an hf: teacher split over devices. Passed on
    as typed; the dump's validation parses them (one place for the library and the CLI, errors naming the flag)."""
    return _stack([
        click.option("--device-map", metavar="auto|balanced|sequential|JSON",
                     help="Split an hf:DIR teacher over this process's GPUs, CPU and disk (through accelerate, in the 'hf' extra): "
                          "a placement transformers computes (auto, balanced, sequential) or a JSON object "
                          "'{\"module.name\": device}' (device: a GPU index, cpu or disk). Inputs go to the device of the input "
                          "embeddings. The logits, and so the cache key, do not depend on it."),
        click.option("--max-memory", metavar="JSON",
                     help="With --device-map: the most each device may hold, e.g. '{\"0\": \"20GiB\", \"cpu\": \"60GiB\"}'; "
                          "what does not fit goes to the next device, then to disk (a temporary folder, removed after; TMPDIR "
                          "chooses where). GPU indices count from the rank's first GPU."),
        click.option("--devices-per-rank", type=int, metavar="N",
                     help="With --device-map under torchrun: local rank r uses GPUs r*N .. r*N+N-1 (8 GPUs, N=4: two ranks, "
                          "each with a teacher split over 4) [default: one GPU per rank; all GPUs without torchrun]."),
    ])


def quiet_option(help_text: str = "No progress bar and no log lines; only the summary and errors.") -> Callable[[F], F]:
    return click.option("--quiet", "-q", is_flag=True, help=help_text)


def json_option(help_text: str) -> Callable[[F], F]:
    return click.option("--json", "as_json", is_flag=True, help=help_text)


def root_argument() -> Callable[[F], F]:
    """``ROOT`` of ``ls`` and ``gc``: an argument, or ``$LOGIT_CACHE_ROOT``."""
    return click.argument("root", required=False, type=click.Path(path_type=Path), envvar=ROOT_ENV)


def require_root(root: Path | None) -> Path:
    """The cache root given (argument, option or ``$LOGIT_CACHE_ROOT``), or a usage error naming both ways."""
    if root is None:
        raise UsageError(f"name the cache root: an argument, or set {ROOT_ENV}")
    return root


#: The text options' dataset kwargs, by option name.
_TEXT_KWARGS = {"--text-column": "text_column", "--seq-len": "seq_len", "--tokenizer": "tokenizer"}


def dataset_text_options() -> Callable[[F], F]:
    """``--text-column``, ``--seq-len`` and ``--tokenizer`` for ``--dataset hf:PATH`` (dump and train), folded into
    the command's ``dataset_kwargs`` (and ``eval_dataset_kwargs`` for an hf: ``--eval-dataset``) by
    :func:`fold_text_options`: as dataset kwargs they enter the cache key, the manifest and the fingerprint, and
    the Python API takes the same kwargs. The command receives the folded kwargs as JSON, as if typed."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def folded(*args: Any, text_column: str | None = None, seq_len: int | None = None, tokenizer: str | None = None,
                   **kwargs: Any) -> Any:
            flags = {"text_column": text_column, "seq_len": seq_len, "tokenizer": tokenizer}
            try:
                for data, data_kwargs in (("dataset", "dataset_kwargs"), ("eval_dataset", "eval_dataset_kwargs")):
                    if data_kwargs in kwargs and (data == "dataset" or is_hf_dataset_spec(kwargs.get(data) or "")):
                        kwargs[data_kwargs] = fold_text_options(kwargs.get(data), kwargs[data_kwargs], flags, kwargs.get("teacher"),
                                                                "--" + data_kwargs.replace("_", "-"))
            except LogitCacheError as exc:
                fail(exc)
            return function(*args, **kwargs)

        return _stack([
            click.option("--text-column", metavar="NAME",
                         help="With --dataset hf:PATH: tokenise this text column (or a column of chat conversations, rendered with "
                              "the tokenizer's chat template): each text followed by EOS, all concatenated and cut into windows of "
                              "--seq-len tokens."),
            click.option("--seq-len", type=int, metavar="N", help="With --text-column: tokens per window [default: 128]."),
            click.option("--tokenizer", metavar="DIR",
                         help="With --text-column: a local tokenizer directory (save_pretrained) [dump's default: the "
                              "--teacher hf:DIR directory]."),
        ])(folded)  # type: ignore[return-value]

    return decorate


def fold_text_options(dataset: str | None, dataset_kwargs: str | None, flags: dict[str, Any], teacher: str | None,
                      what: str = "--dataset-kwargs") -> str | None:
    """``dataset_kwargs`` (JSON) with the text flags given in ``flags`` added, and an ``hf:DIR`` teacher's tokenizer
    when a text column has none; a flag that contradicts the JSON, or text flags for a dataset that is not
    ``hf:PATH``, is a UsageError."""
    given = {name: value for name, value in flags.items() if value is not None}
    if given and not is_hf_dataset_spec(dataset or ""):
        options = ", ".join(option for option, name in _TEXT_KWARGS.items() if name in given)
        raise UsageError(f"{options} tokenise a text column of --dataset hf:PATH; --dataset {dataset!r} is not one")
    kwargs = parse_json_kwargs(dataset_kwargs, what)
    for option, name in _TEXT_KWARGS.items():
        if name in given:
            if name in kwargs and kwargs[name] != given[name]:
                raise UsageError(f"{option} {given[name]!r} contradicts {what} {name}={kwargs[name]!r}; give it once")
            kwargs[name] = given[name]
    kwargs = with_teacher_tokenizer(dataset or "", kwargs, teacher)
    return json.dumps(kwargs) if kwargs else dataset_kwargs
