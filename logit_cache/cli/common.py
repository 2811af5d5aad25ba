"""What every command shares: one-line errors, logging, sizes and a cache's content in words."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import click

from ..errors import LogitCacheError
from ..format.manifest import Manifest
from ..targets import get_kind


def fail(exc: LogitCacheError) -> NoReturn:
    """One line for the user; the whole chain with LOGIT_CACHE_TRACEBACK=1 (for debugging a teacher or dataset)."""
    if os.environ.get("LOGIT_CACHE_TRACEBACK") == "1":
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def describe_targets(manifest: Manifest) -> str:
    """The target kind and its width in words, as the kind says it: top-5, sample-50, full logits."""
    kind = get_kind(manifest.mode)
    return kind.describe(kind.width(manifest))


def what(manifest: Manifest) -> str:
    """A cache's content in a few words: top-5, sample-50 (Ts 2), full logits; its encoding and per token when so."""
    text = describe_targets(manifest)
    text += f" (Ts {manifest.sample_temperature:g})" if manifest.sample_temperature != 1.0 else ""
    text += f", {manifest.encoding} encoding" if manifest.encoding != "plain" else ""
    return text + (" per token" if manifest.per_token else "")
