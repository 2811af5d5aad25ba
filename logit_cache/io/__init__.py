"""Shards on disk: the writer (``.partial`` directory, shard plans, finalise) and the reader (chunk-aware row access)."""
