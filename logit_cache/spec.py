"""Resolve ``module:callable`` specs (teacher architectures, dataset factories).

The current directory is importable, as with ``python -m``, so a user's ``mymodels.py`` beside
them works as ``--arch mymodels:resnet18`` from the console script too. A spec may also name a
file: ``path/to/models.py:resnet18``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import SpecError, UsageError


def resolve_callable(spec: str, what: str) -> Callable[..., Any]:
    """Import ``module:attr`` (or ``file.py:attr``) and return the attribute, which must be callable.

    ``what`` names the option in errors, e.g. ``"--arch"``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SpecError(
            f"{what} {spec!r} is not of the form MODULE:CALLABLE (for example "
            f"'torchvision.models:resnet18' or 'models.py:make_teacher')"
        )
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise SpecError(f"{what} {spec!r}: file {str(path)!r} does not exist")
        unique = f"_logit_cache_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(unique, path)
        if module_spec is None or module_spec.loader is None:
            raise SpecError(f"{what} {spec!r}: cannot import {str(path)!r} as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[unique] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise SpecError(f"{what} {spec!r}: importing {str(path)!r} failed: {exc!r}") from exc
    else:
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise SpecError(
                f"{what} {spec!r}: cannot import module {module_name!r} ({exc!r}); check the name "
                f"and that it is installed or on PYTHONPATH"
            ) from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise SpecError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise SpecError(f"{what} {spec!r}: {attr!r} is not callable")
    return target


def parse_json_kwargs(text: str | None, what: str) -> dict[str, Any]:
    """Parse a ``--*-kwargs`` JSON object; ``None`` or empty means no keyword arguments."""
    if text is None or text.strip() == "":
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} {text!r} is not valid JSON ({exc.msg}); pass an object such as '{{\"num_classes\": 10}}'") from exc
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object (got {type(value).__name__}); for example '{{\"num_classes\": 10}}'")
    return value
