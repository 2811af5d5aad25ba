"""Old import paths: ``logit_cache.reader``, ``logit_cache.dump``, ... keep working after the move
to subpackages, as aliases of the modules that now hold their code (the same module object, so
``monkeypatch`` and ``isinstance`` see one thing).

The finder is installed by ``logit_cache/__init__`` and answers only for the names in
:data:`MOVED`; everything else goes to the normal import machinery. Three old names were both a
module and a function of the package (``dump``, ``train``, ``token_losses``); their modules are
made callable (see :func:`callable_module`) so ``logit_cache.dump(config)`` and
``import logit_cache.dump`` both keep working, whichever is used first.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

#: old module (under ``logit_cache``) -> the module that holds its code now.
MOVED = {
    "catalog": "logit_cache.tools.catalog",
    "compact": "logit_cache.targets.compact",
    "convert": "logit_cache.tools.convert",
    "datasets": "logit_cache.data.datasets",
    "demo": "logit_cache.tools.demo",
    "dump": "logit_cache.pipeline.dump",
    "export_archive": "logit_cache.teachers.export_archive",
    "fingerprint": "logit_cache.format.identity",
    "loader": "logit_cache.data.loader",
    "manifest": "logit_cache.format.manifest",
    "models": "logit_cache.tools.models",
    "outputs": "logit_cache.format.paths",
    "reader": "logit_cache.data.cache",
    "replay": "logit_cache.data.replay",
    "spec": "logit_cache.specs",
    "teacher": "logit_cache.teachers.sources",
    "token_losses": "logit_cache.losses.token",
    "tokens": "logit_cache.data.tokens",
    "train_lm": "logit_cache.train.lm",
    "verify": "logit_cache.tools.verify",
    "writer": "logit_cache.io.writer",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = importlib.import_module(self.target)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        """The target ran when it was imported under its own name; the import machinery has just set
        its ``__spec__`` to the alias's: put its own back (``__name__`` and ``__loader__`` stay)."""
        module.__spec__ = self.own_spec


class LegacyFinder(importlib.abc.MetaPathFinder):
    """Finds ``logit_cache.<old name>`` as the module it moved to."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != "logit_cache" or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(MOVED[name]))


def install() -> None:
    if not any(isinstance(finder, LegacyFinder) for finder in sys.meta_path):
        sys.meta_path.append(LegacyFinder())


class _CallableModule(types.ModuleType):
    """A module that can be called like the function it was named after (the old public API)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["__legacy_call__"](*args, **kwargs)


def callable_module(module_name: str, function: Callable[..., Any]) -> None:
    """Make ``sys.modules[module_name]`` callable as ``function``."""
    module = sys.modules[module_name]
    module.__legacy_call__ = function
    module.__class__ = _CallableModule
