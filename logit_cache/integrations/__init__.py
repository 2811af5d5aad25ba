"""Caches in the training stacks people already use: Hugging Face ``Trainer`` and Lightning.

Each integration is its own module, imported on demand, because its framework is an optional
extra (``pip install 'logit-cache[hf]'`` or ``[lightning]``): importing ``logit_cache`` never
imports transformers or lightning. They sit above :mod:`logit_cache.train` and use only the public
pieces a hand-written loop uses (``open_cache``, ``cache.wrap``, ``cache.sampler``,
``DistillationLoss``), so what they do can be done without them.
"""
