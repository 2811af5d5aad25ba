"""Resolve ``module:callable`` specs (teacher architectures, dataset factories).

Resolving a spec imports its module and so runs that module's code: a spec is code the user chose to run.

The current directory is importable, so a user's ``mymodels.py`` beside them works as
``--arch mymodels:resnet18`` from the console script too. It is searched after everything already on
``sys.path`` (installed packages included), never before: a stray ``transformers.py`` or ``click.py``
in the working directory must not replace the installed package for this import or any later one.
A spec may also name a file, ``path/to/models.py:resnet18``, loaded from that path whatever ``sys.path``
holds: the way to use a local file whose name an installed package also has.

A spec is spelling; what it names is a callable and the arguments it is called with. Identity (a cache
key, a dataset fingerprint) uses :func:`callable_identity` and :func:`bound_kwargs`: the callable's
defining module and ``__qualname__`` (the dotted name its file is importable under, whichever way it was
named, so the key does not depend on where a checkout lives) and the keyword arguments with the
signature's defaults filled in. The spec as typed is still what manifests show.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import SpecError, UsageError

#: The name prefix of modules loaded from a ``file.py:callable`` spec (not importable under that name).
_FILE_MODULE_PREFIX = "_logit_cache_user_"


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
        unique = f"{_FILE_MODULE_PREFIX}{abs(hash(str(path.resolve())))}"
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


def callable_identity(target: Callable[..., Any], spec: str) -> str:
    """``module:qualname`` naming ``target`` whatever spec reached it (``spec`` if nothing better is known).

    ``module`` is the module that defines it (an alias or re-export names the same function), under the
    dotted name its file is importable by from ``sys.path`` (the current directory included, as
    :func:`resolve_callable` searches it), so ``pkg.mod:fn`` and ``pkg/mod.py:fn`` agree. When several
    names reach the file (``tests/`` and the checkout above it both on ``sys.path``), the longest: from
    the outermost entry, the one that depends least on where a process runs. Only a file importable under
    no name is identified by its absolute path.
    """
    module_name = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    if not isinstance(module_name, str) or not isinstance(qualname, str) or "<" in qualname:
        return spec  # a partial, an instance, a lambda or a local: nothing better than the spelling
    file = getattr(sys.modules.get(module_name), "__file__", None)
    names = [] if module_name.startswith(_FILE_MODULE_PREFIX) else [module_name]
    if file is not None:
        names += importable_names(Path(file))
    if not names:
        return f"{Path(file).resolve()}:{qualname}" if file is not None else spec
    return f"{max(names, key=lambda name: name.count('.'))}:{qualname}"


def importable_names(file: Path) -> list[str]:
    """The dotted module names under which ``import`` finds ``file`` from ``sys.path`` and the current
    directory (searched last); found with the path finders, without importing anything."""
    file = file.resolve()
    search = [*sys.path, os.getcwd()]
    names: list[str] = []
    for entry in search:
        try:
            relative = file.relative_to(Path(entry or os.getcwd()).resolve())
        except (ValueError, OSError):
            continue
        if relative.suffix != ".py":
            continue
        parts = list(relative.with_suffix("").parts)
        if parts and parts[-1] == "__init__":
            parts.pop()
        if parts and all(part.isidentifier() for part in parts) and _finds(parts, file, search):
            names.append(".".join(parts))
    package = _package_name(file)
    if package is not None and package not in names:
        names.append(package)
    return names


def _package_name(file: Path) -> str | None:
    """The name ``file`` has inside the regular packages (``__init__.py``) above it, if ``import`` finds that
    name at ``file`` through any finder (an editable install's, say); this imports the parent packages."""
    parts = [file.stem] if file.name != "__init__.py" else []
    folder = file.parent
    while (folder / "__init__.py").is_file() and folder.name.isidentifier():
        parts.insert(0, folder.name)
        folder = folder.parent
    if not parts or not all(part.isidentifier() for part in parts):
        return None
    name = ".".join(parts)
    try:
        found = importlib.util.find_spec(name)
    except Exception:  # a parent package that fails to import, or a name that is not a module
        return None
    origin = getattr(found, "origin", None)
    return name if origin and os.path.isfile(origin) and Path(origin).resolve() == file else None


def _finds(parts: list[str], file: Path, search: list[str]) -> bool:
    """Whether importing ``".".join(parts)`` would load ``file`` (path finders only, nothing executed)."""
    locations: list[str] | None = search
    spec = None
    for part in parts:
        if locations is None:
            return False
        spec = importlib.machinery.PathFinder.find_spec(part, locations)
        if spec is None:
            return False
        locations = list(spec.submodule_search_locations) if spec.submodule_search_locations is not None else None
    origin = getattr(spec, "origin", None)
    return origin is not None and origin not in ("namespace", None) and Path(origin).resolve() == file


def bound_kwargs(target: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` bound to ``target``'s signature with its defaults filled in: the call's arguments, as
    identity sees them (``{}`` and the defaults spelled out agree; a changed value still differs).

    Only defaults that JSON can write down are filled (a default object cannot be passed as JSON, so no
    spelling names it); kwargs that do not bind, or a callable without a signature, stay as given (the
    call itself reports the mistake).
    """
    given = dict(kwargs)
    try:
        bound = inspect.signature(target).bind(**given)
    except (TypeError, ValueError):
        return given
    bound.apply_defaults()
    result: dict[str, Any] = {}
    for name, parameter in inspect.signature(target).parameters.items():
        value = bound.arguments.get(name)
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            result.update(value or {})
        elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL and name in bound.arguments and (name in given or _is_json(value)):
            result[name] = value
    return result


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
