"""Where an ``hf:`` teacher's weights live when one device cannot hold them: ``--device-map``,
``--max-memory`` and ``--devices-per-rank``, parsed and checked here, applied by transformers/accelerate.

The options are checked before any work (a bad JSON or an unknown map name is a one-line UsageError
naming the flag), and GPU indices are made this rank's: under torchrun with ``--devices-per-rank N``
rank ``r`` (its local rank on the node) owns the GPUs ``r*N .. r*N+N-1``, and the GPU indices a user
writes in ``--max-memory`` or a JSON ``--device-map`` count from the rank's first GPU, so one command
line serves every rank. Nothing here imports accelerate; :mod:`.hf` does, when a map is used.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageError

#: The named placements transformers computes itself (``from_pretrained(device_map=NAME)``).
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")
#: Non-GPU places a module (or a memory budget) can name.
_HOST_PLACES = ("cpu", "disk")
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)

Device = int | str


@dataclass(frozen=True)
class Placement:
    """A device map and memory budget made for this rank, ready for ``from_pretrained``.

    ``gpus`` are the physical GPU indices this rank may use (empty: CPU and disk only; None: every
    GPU torch sees, the single-process default); ``offload_folder`` is where accelerate may write
    weights that go to disk (None: a temporary directory, removed with the model).
    """

    device_map: str | dict[str, Device]
    max_memory: dict[Device, int | str] | None = None
    gpus: tuple[int, ...] | None = None
    offload_folder: str | None = None

    @property
    def first_device(self) -> torch.device:
        """The device inputs go to before the model says otherwise: the rank's first GPU, else the CPU."""
        if self.gpus is None:
            return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return torch.device("cuda", self.gpus[0]) if self.gpus else torch.device("cpu")

    def describe(self) -> dict[str, Any]:
        """What the manifest's ``dump`` records (plain JSON: GPU keys become strings)."""
        entry: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory is not None:
            entry["max_memory"] = {str(key): value for key, value in self.max_memory.items()}
        if self.gpus is not None:
            entry["gpus"] = list(self.gpus)
        return json.loads(json.dumps(entry))


def _loads(text: str, flag: str, example: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} {text!r} is not valid JSON ({exc.msg} at character {exc.pos}); e.g. {flag} '{example}'") from exc


def _device(value: Any, flag: str, where: str) -> Device:
    """A place as transformers takes it: a GPU index (int), ``cpu`` or ``disk``; ``cuda:N`` and digit strings become N."""
    if isinstance(value, bool):
        pass
    elif isinstance(value, int) and value >= 0:
        return value
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in _HOST_PLACES:
            return text
        found = re.fullmatch(r"(?:cuda:)?(\d+)", text)
        if found:
            return int(found.group(1))
    raise UsageError(f"{flag}: {where} {value!r} is not a device; use a GPU index (0, 1, ... or cuda:N), cpu or disk")


def parse_device_map(value: str | Mapping[str, Any] | None) -> str | dict[str, Device] | None:
    """``--device-map``: a name transformers knows, or a JSON object ``{"module.name": device}``; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("{"):
            if text in DEVICE_MAP_NAMES:
                return text
            raise UsageError(f"--device-map {value!r} is not one of {', '.join(DEVICE_MAP_NAMES)} or a JSON object "
                             f"{{\"module.name\": device}}, e.g. '{{\"model.embed_tokens\": 0, \"model.layers\": \"cpu\"}}'")
        value = _loads(text, "--device-map", '{"": "cpu"}')
    if not isinstance(value, Mapping) or not value:
        raise UsageError(f"--device-map must be a name ({', '.join(DEVICE_MAP_NAMES)}) or a non-empty JSON object "
                         f"{{\"module.name\": device}}, got {json.dumps(value) if not isinstance(value, str) else value!r}")
    placed: dict[str, Device] = {}
    for module, device in value.items():
        if not isinstance(module, str):
            raise UsageError(f"--device-map: module names must be strings, got {module!r}")
        placed[module] = _device(device, "--device-map", f"the device of {module!r},")
    return placed


def parse_max_memory(value: str | Mapping[Any, Any] | None) -> dict[Device, int | str] | None:
    """``--max-memory``: a JSON object ``{device: budget}``, budgets in bytes or as "20GiB" / "500MB"."""
    if value is None:
        return None
    if isinstance(value, str):
        value = _loads(value, "--max-memory", '{"0": "20GiB", "cpu": "60GiB"}')
    if not isinstance(value, Mapping) or not value:
        raise UsageError(f"--max-memory must be a non-empty JSON object {{device: size}}, e.g. '{{\"0\": \"20GiB\", \"cpu\": "
                         f"\"60GiB\"}}', got {json.dumps(value)}")
    budgets: dict[Device, int | str] = {}
    for key, size in value.items():
        device = _device(key, "--max-memory", "the key")
        good_int = isinstance(size, int) and not isinstance(size, bool) and size >= 0
        if not (good_int or (isinstance(size, str) and _SIZE.match(size))):
            raise UsageError(f"--max-memory: the budget of {key!r} is {size!r}; use bytes (an integer) or a size such as "
                             f"\"500MB\", \"20GiB\"")
        budgets[device] = size if isinstance(size, int) else size.strip().replace(" ", "")
    return budgets


def rank_gpus(local_rank: int, devices_per_rank: int, ranks_on_node: int, visible: int) -> list[int]:
    """The GPUs of one rank: ``local_rank*N .. local_rank*N+N-1``, after checking the node has them all."""
    if devices_per_rank < 1:
        raise UsageError(f"--devices-per-rank must be >= 1, got {devices_per_rank}")
    if visible == 0:
        raise UsageError(f"--devices-per-rank {devices_per_rank} gives each rank GPUs, but torch sees no GPU on this machine; drop it "
                         f"(--device-map with --max-memory '{{\"cpu\": ..., \"disk\": ...}}' splits a teacher over CPU and disk)")
    if ranks_on_node * devices_per_rank > visible:
        raise UsageError(f"--devices-per-rank {devices_per_rank} with {ranks_on_node} rank(s) on this node needs "
                         f"{ranks_on_node * devices_per_rank} GPUs, but torch sees {visible}; lower --devices-per-rank or "
                         f"--nproc_per_node (or check CUDA_VISIBLE_DEVICES)")
    if not 0 <= local_rank < ranks_on_node:
        raise UsageError(f"local rank {local_rank} is not in [0, {ranks_on_node})")
    return list(range(local_rank * devices_per_rank, (local_rank + 1) * devices_per_rank))


def for_gpus(device_map: str | dict[str, Device], max_memory: dict[Device, int | str] | None,
             gpus: list[int] | None) -> Placement:
    """The placement with the user's GPU indices (counted from the rank's first GPU) made physical.

    ``gpus`` None keeps every index as written (one process owns all GPUs). An index past the rank's
    GPUs is a UsageError, as is a budget for GPUs when the rank has none (``--device cpu``).
    """
    if gpus is None:
        return Placement(device_map, max_memory, None)

    def physical(device: Device, flag: str) -> Device:
        if isinstance(device, str):
            return device
        if device >= len(gpus):
            owned = f"GPUs {gpus[0]}..{gpus[-1]} (0..{len(gpus) - 1} as you count them)" if gpus else "no GPU"
            raise UsageError(f"{flag} names GPU {device}, but this rank has {owned}; GPU indices count from the rank's first GPU")
        return gpus[device]

    mapped = device_map if isinstance(device_map, str) else {name: physical(d, "--device-map") for name, d in device_map.items()}
    budgets = None if max_memory is None else {physical(d, "--max-memory"): size for d, size in max_memory.items()}
    return Placement(mapped, budgets, tuple(gpus))


def resolve_placement(device_map: str | dict[str, Device], max_memory: dict[Device, int | str] | None,
                      devices_per_rank: int | None, device_spec: str, local_rank: int = 0, world_size: int = 1,
                      ranks_on_node: int | None = None, visible: int | None = None) -> Placement:
    """This rank's placement from the dump's options: which GPUs (``--device``, ``--devices-per-rank``, the rank) and the map.

    ``--device cpu`` keeps the teacher on the CPU and disk; ``auto`` (or ``cuda``) uses GPUs when there are
    some: every GPU for a single process, the rank's own GPU under torchrun, or ``--devices-per-rank`` of them.
    """
    visible = torch.cuda.device_count() if visible is None else visible
    ranks_on_node = world_size if ranks_on_node is None else ranks_on_node
    spec = device_spec.strip().lower()
    if spec not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {device_spec} with --device-map: the map chooses the GPUs; use --device auto, cuda or cpu "
                         f"(and --devices-per-rank N, or GPU indices in a JSON --device-map / --max-memory)")
    if spec == "cuda" and visible == 0:
        raise UsageError("--device cuda asked for GPUs, but torch sees none; use --device cpu (or auto)")
    if devices_per_rank is not None:
        if spec == "cpu":
            raise UsageError(f"--devices-per-rank {devices_per_rank} gives each rank GPUs; --device cpu uses none: drop one of them")
        return for_gpus(device_map, max_memory, rank_gpus(local_rank, devices_per_rank, ranks_on_node, visible))
    if spec == "cpu" or visible == 0:
        return for_gpus(device_map, max_memory, [])
    if world_size > 1:  # one GPU per rank, as without a map
        if local_rank >= visible:
            raise UsageError(f"local rank {local_rank} has no GPU of its own (torch sees {visible}); use --device cpu or fewer ranks")
        return for_gpus(device_map, max_memory, [local_rank])
    return for_gpus(device_map, max_memory, None)
