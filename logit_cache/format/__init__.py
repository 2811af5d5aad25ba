"""Reading and writing a cache's files: the manifest, identity (keys and fingerprints), array layout, output paths."""
