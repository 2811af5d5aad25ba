"""Commands on caches: verify, convert, the catalog of a shared root, the demo and its models."""
