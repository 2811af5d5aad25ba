"""Resolve ``module:callable`` specs (teacher architectures, dataset factories).

Resolving a spec imports its module and so runs that module's code: a spec is code the user chose to run.

The current directory is importable, so a user's ``mymodels.py`` beside them works as
``--arch mymodels:resnet18`` from the console script too. It is searched after everything already on
``sys.path`` (installed packages included), never before: a stray ``transformers.py`` or ``click.py``
in the working directory must not replace the installed package for this import or any later one.
A spec may also name a file, ``path/to/models.py:resnet18``, loaded from that path whatever ``sys.path``
holds: the way to use a local file whose name an installed package also has.
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
            # Last, after installed packages: a file here is found only when nothing installed has its name.
            sys.path.append(cwd)
            importlib.invalidate_caches()
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
            raise SpecError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}{_shadow_hint(module, module_name)}")
        target = getattr(target, part)
    if not callable(target):
        raise SpecError(f"{what} {spec!r}: {attr!r} is not callable")
    return target


def _shadow_hint(module: Any, module_name: str) -> str:
    """A hint when a file in the current directory has the module's name but an installed module was imported."""
    local = Path(os.getcwd(), *module_name.split("."))
    candidates = [local.with_suffix(".py"), local / "__init__.py"]
    found = next((str(c) for c in candidates if c.is_file()), None)
    loaded = getattr(module, "__file__", None)
    if found is None or (loaded and Path(loaded).resolve() == Path(found).resolve()):
        return ""
    return (
        f" (it was imported from {loaded or 'a built-in module'}: the current directory is searched after installed "
        f"packages; to use {found}, pass its path: {found}:CALLABLE)"
    )


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
