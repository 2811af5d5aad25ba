"""The dump: a teacher over a dataset into a cache."""
