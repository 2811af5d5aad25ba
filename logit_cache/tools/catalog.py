"""Sharing caches: cache roots, names by content key, one writer per cache, listing and clean-up.

A **cache root** is a directory (``--cache-root`` or ``LOGIT_CACHE_ROOT``) holding caches named
``<readable part>--<key>``: the readable part says what is inside (dataset, mode, dtype, views), the
key (``fingerprint.py``) is what identifies it. A dump into a root first looks for a complete cache
with its key (whatever the readable part) and reuses it; only if there is none does it compute.

**One writer.** Every writer into a root (a dump, a ``convert``, and ``rm``/``gc`` for the moment of
taking a cache away) holds ``.<name>.lock`` beside its output while it works: a JSON record of host,
pid, start time, boot id and pid namespace, created with ``O_EXCL`` and touched every few seconds (a
heartbeat). A second dump of the same cache waits for the lock to go (then finds the cache complete
and reuses it), or fails at once with ``wait=False``. A lock is stale, and taken over, when its holder
is provably dead (same host, boot and pid namespace: the pid is gone, a zombie, or now another
process), or else when its heartbeat is older than ``STALE_SECONDS`` (another host, a container with
its own pids: a pid there says nothing here). A dump killed with ``kill -9`` leaves such a lock, and
its unfinished ``.partial`` work is resumed by the next dump of the key.

**Deleting only what is ours.** ``rm``, ``gc`` and ``--overwrite`` delete a directory only when it
is provably logit-cache's: a ``manifest.json`` with our fields (``format_version``, ``key``,
``shards``...), or an ``OUT.partial`` holding the marker a dump or conversion writes when it creates
it (``writer.WORK_MARKER``). A deletion first renames the directory to a hidden tombstone, so a kill
mid-way leaves nothing under the cache's name; ``gc`` deletes tombstones, the ``NAME.replaced-PID``
of an interrupted ``--overwrite``, stale locks and temporary manifests a killed writer left. A cache
whose manifest cannot be read (another user's, mode 0600) is never taken for an unfinished one.

**Unused caches.** Readers write nothing into a cache (it may be a read-only mount), so "unused"
is read from the manifest's access time, which most file systems update at most daily (``relatime``)
and some never (``noatime``): ``gc --unused-days`` says which it relies on.

Where the parts live (this module re-exports them under their old names): names of caches in
:mod:`logit_cache.format.naming`, the writer's lock in :mod:`logit_cache.io.locks`, finding by key
and sizes in :mod:`logit_cache.io.lookup` (the dump and ``convert`` need those), listing in
:mod:`logit_cache.tools.listing`, ``rm`` and ``gc`` in :mod:`logit_cache.tools.cleanup`.
"""

from __future__ import annotations

# moved to format/naming.py, io/locks.py, io/lookup.py, tools/listing.py and tools/cleanup.py
from ..format.naming import ROOT_ENV, cache_dir_name, readable_name
from ..io.locks import HEARTBEAT_SECONDS, POLL_SECONDS, STALE_INFIX, STALE_SECONDS, lock_is_stale, lock_path, writer_lock
from ..io.locks import holder_record as _holder
from ..io.lookup import directory_bytes, find_by_key
from .cleanup import GcCandidate, check_removable, gc_candidates, remove_cache
from .listing import MIN_KEY_PREFIX, CacheEntry, caches_by_key, list_caches

__all__ = [
    "HEARTBEAT_SECONDS",
    "MIN_KEY_PREFIX",
    "POLL_SECONDS",
    "ROOT_ENV",
    "STALE_INFIX",
    "STALE_SECONDS",
    "CacheEntry",
    "GcCandidate",
    "_holder",
    "cache_dir_name",
    "caches_by_key",
    "check_removable",
    "directory_bytes",
    "find_by_key",
    "gc_candidates",
    "list_caches",
    "lock_is_stale",
    "lock_path",
    "readable_name",
    "remove_cache",
    "writer_lock",
]
