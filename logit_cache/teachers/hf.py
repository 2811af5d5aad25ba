"""``hf:DIR`` teachers: a local Hugging Face ``transformers`` causal LM directory (``save_pretrained``).

Its config names the architecture; it is loaded with ``AutoModelForCausalLM`` from local files only
(nothing is downloaded, no code from the directory runs), in float32, and weights the files lack are an
error (transformers would initialise them at random). Its identity is :func:`hf_sha256`: the whole
directory, config included (see :func:`~logit_cache.teachers.sources.teacher_sha256`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, CheckpointNotFoundError, MissingPackageError, UsageError
from ..format.identity import directory_sha256
from .common import Loaded, LoadRequest, last_line, listed, refuse_arch

logger = logging.getLogger(__name__)

#: The prefix of a teacher spec naming a local Hugging Face model directory: ``hf:DIR``.
HF_PREFIX = "hf:"
#: What a Hugging Face model directory holds, for error messages.
_HF_DIR_HOLDS = (
    "a Hugging Face model directory (written by model.save_pretrained(DIR)) holds config.json and the weights "
    "(model.safetensors, or model-0000N-of-0000M.safetensors shards with model.safetensors.index.json)"
)


def is_hf_spec(spec: str | Path) -> bool:
    """Whether a teacher spec names a Hugging Face model directory: a string ``"hf:DIR"`` (a Path never does)."""
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def hf_dir(spec: str) -> Path:
    """The directory of an ``"hf:DIR"`` spec (``~`` expanded); UsageError for any other spec or an empty DIR."""
    if not is_hf_spec(spec):
        raise UsageError(f"teacher spec {str(spec)!r} does not start with {HF_PREFIX!r}; expected hf:DIR")
    rest = spec[len(HF_PREFIX) :]
    if not rest:
        raise UsageError(f"teacher spec {spec!r} names no directory; pass hf:DIR, DIR written by save_pretrained")
    return Path(rest).expanduser()


def hf_sha256(spec: str) -> str:
    """The ``hf:DIR`` digest: :func:`~logit_cache.format.identity.directory_sha256` of DIR (hidden entries
    and ``__pycache__`` skipped), with errors that name the teacher."""
    directory = hf_dir(spec)
    if not directory.exists():
        raise CheckpointNotFoundError(f"teacher {spec!r}: directory {str(directory)!r} does not exist; check the path")
    if not directory.is_dir():
        raise CheckpointError(f"teacher {spec!r}: {str(directory)!r} is a file, not a directory; for a checkpoint file drop the hf: prefix")
    try:
        return directory_sha256(directory)
    except OSError as exc:
        raise CheckpointError(f"cannot read teacher {spec!r} to hash it: {exc}") from exc


def load_hf(spec: str, request: LoadRequest) -> Loaded:
    """The ``hf`` source: ``hf:DIR`` as a causal LM, local files only, no code from the directory, every
    weight from the files; it refuses ``arch`` and needs no ``trust_checkpoint`` (nothing is unpickled).

    The model is loaded in float32 whatever dtype it was saved in (transformers 5 would otherwise keep the
    saved dtype, 4.x casts to float32): the dump's ``--precision`` chooses a reduced compute dtype through
    autocast, and a cache key without a precision means fp32 logits.
    """
    directory = hf_dir(spec)
    refuse_arch(spec, "hf", request.arch, request.kwargs)
    if not directory.exists():
        raise CheckpointNotFoundError(f"teacher {spec!r}: directory {str(directory)!r} does not exist; check the path")
    if not directory.is_dir():
        raise CheckpointError(
            f"teacher {spec!r}: {str(directory)!r} is a file, not a directory; hf: takes a model directory "
            f"({_HF_DIR_HOLDS}); for a checkpoint file drop the hf: prefix"
        )
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"teacher {spec!r}: {str(directory)!r} has no config.json, so it is not a model directory; {_HF_DIR_HOLDS}")
    transformers = _import_transformers(spec)
    model = _hf_causal_lm(transformers, directory, spec)
    return Loaded(model, "hf", "hf", type(model).__name__)


def _import_transformers(spec: str) -> Any:
    """``transformers``, imported only for ``hf:`` teachers (it takes seconds); MissingPackageError without it."""
    try:
        import transformers
    except ImportError as exc:
        raise MissingPackageError(
            f"teacher {spec!r} is a Hugging Face model directory, which needs the transformers package ({exc}); "
            f"install it with pip install 'logit-cache[hf]' (or pip install transformers)"
        ) from exc
    return transformers


def _dtype_argument(transformers: Any) -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    found = re.match(r"(\d+)\.(\d+)", transformers.__version__)
    version = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    return "dtype" if version >= (4, 56) else "torch_dtype"


def _hf_causal_lm(transformers: Any, directory: Path, spec: str) -> nn.Module:
    """Read the config, check it describes a causal LM, load the weights, and refuse weights left random.

    ``from_pretrained`` initialises every weight the files lack at random and only logs it (a base
    ``BertModel`` directory loads as ``BertLMHeadModel`` with a random LM head); for a teacher that means
    noise in the whole cache, so missing weights are an error here, as ``strict=True`` is for state dicts.
    """
    where = str(directory)
    try:
        config = transformers.AutoConfig.from_pretrained(where, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read the config of teacher {spec!r} ({where}/config.json): {last_line(str(exc))}; models whose "
            f"code lives in the directory (trust_remote_code) are not supported"
        ) from exc
    model_type = getattr(config, "model_type", None)
    architectures = getattr(config, "architectures", None)
    described = f"model_type {model_type!r}, architectures {architectures}"
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise CheckpointError(
            f"teacher {spec!r}: {where} holds a model that is not a causal language model ({described}); only "
            f"causal LMs (models AutoModelForCausalLM loads: GPT-2, Llama, Mistral, Qwen...) are supported as hf: teachers"
        )
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            where,
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            output_loading_info=True,
            **{_dtype_argument(transformers): torch.float32},
        )
    except Exception as exc:
        raise CheckpointError(f"cannot load teacher {spec!r} ({described}): {last_line(str(exc))}; {_HF_DIR_HOLDS}") from exc
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(entry[0] if isinstance(entry, tuple) else entry) for entry in info.get("mismatched_keys") or ())
    if missing or mismatched:
        parts = [f"missing ({len(missing)}): {listed(missing)}"] if missing else []
        parts += [f"shape mismatch ({len(mismatched)}): {listed(mismatched)}"] if mismatched else []
        raise CheckpointError(
            f"teacher {spec!r} ({described}) does not hold every weight of {type(model).__name__}: {'; '.join(parts)}. "
            f"transformers would initialise these at random and the logits would be noise; save the whole causal LM "
            f"(the ...ForCausalLM / ...LMHeadModel model, with its LM head) with save_pretrained"
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        used_by = type(model).__name__
        logger.info("teacher %s: %d weights in the files are not used by %s: %s", spec, len(unexpected), used_by, listed(unexpected))
    # A teacher scores each batch once and never generates: a KV cache returned with every output would only
    # hold memory until the batch's logits are taken. This is the instance's config, nothing global.
    model.config.use_cache = False
    return model
