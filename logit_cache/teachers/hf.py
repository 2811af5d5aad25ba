"""``hf:DIR`` teachers: a local Hugging Face ``transformers`` causal LM directory (``save_pretrained``).

Its config names the architecture; it is loaded with ``AutoModelForCausalLM`` from local files only
(nothing is downloaded, no code from the directory runs), in the dtype of ``--precision`` (float32 by
default), and weights the files lack are an error (transformers would initialise them at random). With a
device map (:mod:`.placement`) transformers and accelerate spread it over GPUs, CPU and disk. Its identity is :func:`hf_sha256`: the whole
directory, config included (see :func:`~logit_cache.teachers.sources.teacher_sha256`).
"""

from __future__ import annotations

import importlib
import logging
import re
import shutil
import tempfile
import weakref
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

    The model is loaded in ``request.dtype`` whatever dtype it was saved in (transformers 5 would otherwise
    keep the saved dtype, 4.x casts to float32): float32 by default (a cache key without a precision means
    fp32 logits), bfloat16/float16 for ``--precision bf16/fp16``, read tensor by tensor from the memory-mapped
    safetensors, so no float32 copy is made. A file saved in another dtype is converted as it is read: its
    pages pass through the OS page cache (clean, reclaimable memory), the process holds only the result.
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
    transformers = _import_extra("transformers", spec, "a Hugging Face model directory")
    placement = request.placement
    if placement is None:
        model = _hf_causal_lm(transformers, directory, spec, request.dtype, {})
        return Loaded(model, "hf", "hf", type(model).__name__, in_dtype=True)
    _import_extra("accelerate", spec, "--device-map places its layers through accelerate")
    folder = placement.offload_folder or tempfile.mkdtemp(prefix="logit-cache-offload-")
    try:
        model = _hf_causal_lm(transformers, directory, spec, request.dtype, _placement_kwargs(placement, folder))
    except BaseException:
        if placement.offload_folder is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if placement.offload_folder is None:  # the model reads offloaded weights from it as long as it lives
        weakref.finalize(model, shutil.rmtree, folder, ignore_errors=True)
    placed = {name: str(device) for name, device in (getattr(model, "hf_device_map", None) or {}).items()}
    device = input_device(model)
    detail = f"{type(model).__name__}, device map {placed or 'one device'}, inputs on {device}"
    return Loaded(model, "hf", "hf", detail, in_dtype=True, input_device=device, device_map=placed or {"": str(device)})


def _placement_kwargs(placement: Any, folder: str) -> dict[str, Any]:
    """``from_pretrained``'s placement arguments; a named map with no budget gets one for the rank's GPUs only."""
    # copies: transformers rewrites the dicts it is given (sizes to bytes), and the manifest records ours
    device_map = placement.device_map if isinstance(placement.device_map, str) else dict(placement.device_map)
    kwargs: dict[str, Any] = {"device_map": device_map, "offload_folder": folder}
    budgets = None if placement.max_memory is None else dict(placement.max_memory)
    if budgets is None and isinstance(placement.device_map, str) and placement.gpus is not None:
        # transformers' default budget covers every GPU torch sees, other ranks' too: name this rank's alone
        import psutil  # an accelerate dependency

        budgets = {gpu: int(torch.cuda.mem_get_info(gpu)[0] * 0.9) for gpu in placement.gpus}
        budgets["cpu"] = int(psutil.virtual_memory().available * 0.9)
    if budgets is not None and isinstance(placement.device_map, str):
        kwargs["max_memory"] = budgets
    return kwargs


def input_device(model: nn.Module) -> torch.device:
    """Where a placed model wants its inputs: the device its input embeddings run on.

    accelerate runs modules placed on ``cpu`` or ``disk`` on the model's main device (its first GPU, or
    the CPU without one) and returns the outputs to the inputs' device, so inputs on this device get the
    logits back there, with no extra copy.
    """
    placed = getattr(model, "hf_device_map", None)
    if not placed:
        return next(iter(model.parameters())).device
    gpus = [device for device in placed.values() if str(device) not in ("cpu", "disk")]
    main = _as_device(gpus[0]) if gpus else torch.device("cpu")
    embeddings = model.get_input_embeddings()
    name = next((name for name, module in model.named_modules() if module is embeddings), "")
    owners = [key for key in placed if key == "" or name == key or name.startswith(key + ".")]
    where = placed[max(owners, key=len)] if owners else gpus[0] if gpus else "cpu"
    return main if str(where) in ("cpu", "disk") else _as_device(where)


def _as_device(value: Any) -> torch.device:
    return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)


def _import_extra(module: str, spec: str, needs: str) -> Any:
    """``module`` of the ``hf`` extra, imported only when an ``hf:`` teacher needs it (transformers takes
    seconds to import); MissingPackageError naming the extra without it. ``needs`` says what needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingPackageError(
            f"teacher {spec!r}: {needs}, which needs the {module} package ({exc}); install it with "
            f"pip install 'logit-cache[hf]' (or pip install {module})"
        ) from exc


def _dtype_argument(transformers: Any) -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    found = re.match(r"(\d+)\.(\d+)", transformers.__version__)
    version = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    return "dtype" if version >= (4, 56) else "torch_dtype"


def _hf_causal_lm(transformers: Any, directory: Path, spec: str, dtype: torch.dtype, placement: dict[str, Any]) -> nn.Module:
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
            **{_dtype_argument(transformers): dtype},
            **placement,
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
