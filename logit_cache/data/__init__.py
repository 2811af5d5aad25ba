"""Datasets: specs and built-ins, token windows, replayed views, and the DataLoader side (wrap, sampler, collate)."""
