"""The cache format: the manifest, identity (keys and fingerprints), array layout, cache names and output paths."""

from __future__ import annotations

from .completeness import unfinished_work
from .identity import content_key, dataset_fingerprint, directory_sha256, file_sha256, key_payload, manifest_key, record_key
from .layout import Layout, ShardPlan, array_specs, chunk_and_shard_rows, plan_layout, plan_shards, plan_token_shards, split_for_rank
from .manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, ShardEntry, read_manifest, write_json_atomic, write_manifest
from .naming import ROOT_ENV, cache_dir_name, readable_name
from .paths import PARTIAL_SUFFIX, check_writable, output_errors, partial_path

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PARTIAL_SUFFIX",
    "ROOT_ENV",
    "Layout",
    "Manifest",
    "ShardEntry",
    "ShardPlan",
    "array_specs",
    "cache_dir_name",
    "check_writable",
    "chunk_and_shard_rows",
    "content_key",
    "dataset_fingerprint",
    "directory_sha256",
    "file_sha256",
    "key_payload",
    "manifest_key",
    "output_errors",
    "partial_path",
    "plan_layout",
    "plan_shards",
    "plan_token_shards",
    "read_manifest",
    "readable_name",
    "record_key",
    "split_for_rank",
    "unfinished_work",
    "write_json_atomic",
    "write_manifest",
]
