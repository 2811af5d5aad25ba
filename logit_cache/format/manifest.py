"""The manifest: a cache's self-description, its versioned JSON, validation on read, atomic write.

``manifest.json`` is the last file a dump writes, and it is written atomically (a temporary file,
fsync, then ``os.replace``), so a reader sees either the previous manifest or the new one, never a
torn file. ``complete: true`` is the promise that every shard listed is closed and checksummed.
Reading a manifest writes nothing; it may be read from an fsspec URL (see :func:`read_manifest`).
Field meanings are the contract of DESIGN.md section 3.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import store
from ..errors import CacheFormatError, CacheNotFoundError
from ..store.base import URLPath, as_location, is_url, url_filesystem
from ..targets import get_kind, kind_names
from ..targets.dtypes import VALUE_DTYPES  # re-exported: the manifest's value dtypes

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: What the temporary files of :func:`write_json_atomic` end with (``.manifest.json.<random>.partial``).
JSON_TEMP_SUFFIX = ".partial"


def __getattr__(name: str) -> Any:
    """``MODES`` (the registered target kinds) and ``BACKENDS`` (``logit_cache.store.BACKENDS``'s names),
    read from their registries when asked."""
    if name == "MODES":
        return kind_names()
    if name == "BACKENDS":
        return tuple(store.BACKENDS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class ShardEntry:
    """One shard: its path (relative to the cache directory), row and sample ranges, checksum."""

    path: str
    row_start: int
    row_stop: int
    sample_start: int
    sample_stop: int
    checksum: str


@dataclass
class Manifest:
    """Everything a reader needs to interpret a cache, and what identifies its content."""

    backend: str
    mode: str
    k: int | None
    num_classes: int
    dtype: str
    temperature: float
    num_samples: int
    num_rows: int
    views: int
    seed: int | None
    per_token: bool
    teacher: dict[str, Any]
    dataset: dict[str, Any]
    key: str
    shards: list[ShardEntry] = field(default_factory=list)
    complete: bool = False
    m: int | None = None
    #: sampled mode: the temperature of the distribution ids were drawn from (Ts).
    sample_temperature: float = 1.0
    created_at: str = ""
    tool_version: str = ""
    torch_version: str = ""
    format_version: int = FORMAT_VERSION
    #: Layout of the logical arrays; "plain" is float16/float32 values and uint16/int32 ids.
    encoding: str = "plain"
    #: Rows per chunk of every array (the reader's unit of I/O) and the shard size asked for.
    chunk_rows: int = 0
    shard_rows: int = 0
    #: Arrays every shard holds: name -> {"dtype": str, "row_shape": [..]} (row_shape excludes rows).
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: How the dump ran (device, precision, batch size, seconds): informative, not identity.
    dump: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "manifest") -> Manifest:
        """Validate and build; every problem names the field and the file."""
        if not isinstance(data, dict):
            raise CacheFormatError(f"{source}: expected a JSON object, found {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            hint = (
                "it was written by a newer logit-cache: upgrade logit-cache to read it"
                if isinstance(version, int) and version > FORMAT_VERSION
                else "it is not a logit-cache manifest of a known version"
            )
            raise CacheFormatError(f"{source}: format_version is {version!r}, this logit-cache reads {FORMAT_VERSION}; {hint}")
        known = {f.name for f in fields(cls)}
        required = {
            "backend", "mode", "k", "num_classes", "dtype", "temperature", "num_samples", "num_rows",
            "views", "seed", "per_token", "teacher", "dataset", "key", "shards", "complete",
        }
        missing = sorted(required - set(data))
        if missing:
            raise CacheFormatError(f"{source}: missing field(s) {', '.join(missing)}; the manifest is damaged or not a cache manifest")
        kwargs = {name: value for name, value in data.items() if name in known}
        try:
            kwargs["shards"] = [ShardEntry(**entry) for entry in data["shards"]]
        except TypeError as exc:
            raise CacheFormatError(f"{source}: field 'shards' has a malformed entry ({exc})") from exc
        manifest = cls(**kwargs)
        manifest.validate(source)
        return manifest

    def validate(self, source: str = "manifest") -> None:
        """Check the invariants a reader relies on; raise CacheFormatError naming the field."""

        def bad(name: str, why: str) -> CacheFormatError:
            return CacheFormatError(f"{source}: field {name!r} {why}")

        if self.backend not in store.BACKENDS:
            raise bad("backend", f"is {self.backend!r}, expected one of {', '.join(store.BACKENDS)}")
        if self.mode not in kind_names():
            raise bad("mode", f"is {self.mode!r}, expected one of {', '.join(kind_names())}")
        if self.dtype not in VALUE_DTYPES:
            raise bad("dtype", f"is {self.dtype!r}, expected one of {', '.join(VALUE_DTYPES)}")
        get_kind(self.mode).validate(self, bad)
        if self.views < 1:
            raise bad("views", f"is {self.views!r}, expected >= 1")
        for position, shard in enumerate(self.shards):
            why = shard_path_problem(shard.path)
            if why:
                raise bad("shards", f"entry {position} has path {shard.path!r}, which {why}; a shard path is a name inside the "
                                    f"cache directory, such as 'shard-00000.zarr' (the manifest was edited or is not a cache's)")
        if self.complete:
            row = 0
            sample = 0
            for position, shard in enumerate(self.shards):
                if shard.row_start != row or shard.sample_start != sample:
                    raise bad("shards", f"entry {position} ({shard.path}) does not start where the previous one stopped")
                if shard.row_stop < shard.row_start or shard.sample_stop < shard.sample_start:
                    raise bad("shards", f"entry {position} ({shard.path}) has a negative range")
                row, sample = shard.row_stop, shard.sample_stop
            if row != self.num_rows or sample != self.num_samples:
                raise bad("shards", f"cover {row} rows / {sample} samples, but num_rows={self.num_rows}, num_samples={self.num_samples}")


def shard_path_problem(path: Any) -> str | None:
    """Why ``path`` cannot be a shard's path in a manifest, or None when it can.

    A shard path is relative to the cache directory and stays inside it: not absolute, no ``..``
    (``/etc/passwd`` or ``../../other-cache/shard-00000.zarr`` would make a reader open files that are
    not the cache's). We write one plain name (``shard-00000.zarr``); relative paths of several
    components without ``..`` are accepted. Symlinks are checked by readers of local caches, which
    resolve the path and check that it stays inside the cache directory.
    """
    if not isinstance(path, str) or not path:
        return "is not a non-empty string"
    if "\\" in path or "\x00" in path:
        return "holds a backslash or a NUL character"
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        return "is absolute"
    parts = path.split("/")
    if ".." in parts:
        return "leaves the cache directory (a '..' component)"
    if any(part in ("", ".") for part in parts):
        return "has an empty or '.' component"
    return None


def manifest_path(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / MANIFEST_NAME


def read_manifest(cache_dir: str | Path, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Read and validate ``cache_dir/manifest.json`` (read-only: nothing is written).

    ``cache_dir`` may be an fsspec URL (``s3://bucket/cache``, ``memory://...``, ``file:///...``),
    read through fsspec with ``storage_options``; messages then show the URL.
    """
    if is_url(cache_dir):
        return _read_remote_manifest(URLPath(cache_dir), storage_options)
    as_location(cache_dir, storage_options)  # storage_options with a local path: a usage error
    path = manifest_path(cache_dir)
    if not path.is_file():
        if not Path(cache_dir).exists():
            raise CacheNotFoundError(f"{cache_dir}: no such cache directory")
        raise CacheNotFoundError(f"{cache_dir}: no {MANIFEST_NAME} in it: not a logit-cache cache, or a dump that never started")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheFormatError(f"{path}: cannot be read as JSON ({exc})") from exc
    return Manifest.from_dict(data, str(path))


def _read_remote_manifest(url: URLPath, storage_options: dict[str, Any] | None) -> Manifest:
    fs, root = url_filesystem(url, storage_options)
    inner = f"{root.rstrip('/')}/{MANIFEST_NAME}"
    shown = url / MANIFEST_NAME
    try:
        found = fs.isfile(inner)
        missing_dir = not found and not fs.exists(root)
    except OSError as exc:  # credentials, network: fsspec's own message says which
        raise CacheNotFoundError(f"{url}: cannot be reached through fsspec ({exc!r})") from exc
    if missing_dir:
        raise CacheNotFoundError(f"{url}: no such cache directory")
    if not found:
        raise CacheNotFoundError(f"{url}: no {MANIFEST_NAME} in it: not a logit-cache cache, or a dump that never started")
    try:
        data = json.loads(fs.cat_file(inner))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CacheFormatError(f"{shown}: cannot be read as JSON ({exc})") from exc
    return Manifest.from_dict(data, shown)


def path_exists(location: str | Path, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a local path or an fsspec URL exists (reading only)."""
    if is_url(location):
        fs, inner = url_filesystem(location, storage_options)
        return bool(fs.exists(inner))
    return Path(location).exists()


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` so that readers see the old file or the new one, never a torn one.

    The temporary file (``.NAME.<random>.partial`` beside ``path``) is created with ``os.open(...,
    0o666)``, as a plain ``open()`` would, so the file gets the mode the user's umask (and the
    directory's default ACL) gives: in a group-shared cache root (setgid, umask 002) teammates can read
    it. ``tempfile.mkstemp`` would make it 0600, readable by its owner only.
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp_name = str(path.parent / f".{path.name}.{secrets.token_hex(4)}{JSON_TEMP_SUFFIX}")
        try:
            handle = os.open(tmp_name, flags, 0o666)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 32 random bits
        raise FileExistsError(f"{path.parent}: could not create a temporary file for {path.name}")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(data, out, indent=2, sort_keys=False)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def is_json_temp(name: str) -> bool:
    """Whether ``name`` is a temporary file :func:`write_json_atomic` left behind (killed before its rename)."""
    return name.startswith(".") and name.endswith(JSON_TEMP_SUFFIX) and ".json." in name


def write_manifest(cache_dir: str | Path, manifest: Manifest) -> None:
    manifest.validate(str(manifest_path(cache_dir)))
    write_json_atomic(manifest_path(cache_dir), manifest.to_dict())
