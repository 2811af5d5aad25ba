"""The package layout's rules, read from the source: layers import only downwards, no import cycles,
small modules, target-kind and backend names only in their registries, old import paths still work.

These are the rules of the README's Development section; each test names the offending file.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import logit_cache
from logit_cache import _legacy

PACKAGE = Path(logit_cache.__file__).parent

#: Low to high. A module may import from its own layer or a lower one, never a higher one.
LAYERS = ["errors", "specs", "_legacy", "store", "targets", "format", "io", "data", "teachers", "losses",
          "pipeline", "train", "integrations", "tools", "cli"]
#: Modules above every layer: they re-export or run the whole package.
TOP = {"__init__", "__main__"}
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(["logit_cache", *parts])] = path
    return found


MODULES = _modules()


def _layer(module: str) -> str:
    """The layer of ``logit_cache.x.y``: its first component after the package."""
    return module.split(".")[1]


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported logit_cache module, line, at module level) for each import of a package module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("logit_cache."):
                # the longest prefix that is a module of ours (``from .x import name`` names a module or an attribute)
                while name not in MODULES and name.count(".") > 1:
                    name = name.rpartition(".")[0]
                if name in MODULES:
                    found.append((name, node.lineno, id(node) in top_level))
    return found


def test_every_module_belongs_to_a_layer():
    strays = [m for m in MODULES if m != "logit_cache" and _layer(m) not in LAYERS and _layer(m) not in TOP]
    assert strays == [], f"modules outside the layers of the README's Development section: {strays}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, path in MODULES.items():
        if module == "logit_cache" or _layer(module) in TOP:
            continue
        mine = LAYERS.index(_layer(module))
        for target, line, _ in _imports(module, path):
            if target == "logit_cache":
                # ``from .. import __version__`` reads a constant set before anything is imported
                if "__version__" in path.read_text().splitlines()[line - 1]:
                    continue
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports the package root")
                continue
            if _layer(target) in TOP:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
            elif LAYERS.index(_layer(target)) > mine:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} ({_layer(module)}) imports {target} ({_layer(target)})")
    assert upward == [], "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules():
    """Module-level and deferred imports alike: a cycle hidden in a function is still a cycle of concepts."""
    graph = {module: {target for target, _, _ in _imports(module, path) if target != module}
             for module, path in MODULES.items() if module != "logit_cache"}
    # a package's __init__ importing its own submodules is how it re-exports, not a cycle of concepts
    for module in graph:
        graph[module] = {t for t in graph[module] if not (t.startswith(module + ".") or (module.startswith(t + ".") and
                                                           MODULES[t].name == "__init__.py"))}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(PACKAGE)} has {lines} lines; split it by job (at most ~400)"


def _compared_strings(path: Path) -> list[tuple[int, str]]:
    """String constants used as values in code (comparisons, containers, dict keys, defaults of fields and
    arguments), not docs or messages."""
    tree = ast.parse(path.read_text())
    messages = set()
    for node in ast.walk(tree):
        # f-strings, call arguments that are messages, docstrings
        if isinstance(node, ast.JoinedStr):
            messages.update(id(v) for v in ast.walk(node))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and ast.get_docstring(node):
            messages.add(id(node.body[0].value))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for part in [node.left, *node.comparators]:
                for leaf in ast.walk(part):
                    if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str) and id(leaf) not in messages:
                        found.append((leaf.lineno, leaf.value))
        elif isinstance(node, ast.Dict):
            for key in node.keys:
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    found.append((key.lineno, key.value))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            found.append((node.lineno, node.value.value))  # a dataclass field's default
        elif isinstance(node, ast.arguments):
            for default in [*node.defaults, *node.kw_defaults]:
                if isinstance(default, ast.Constant) and isinstance(default.value, str):
                    found.append((default.lineno, default.value))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and isinstance(getattr(node, "ctx", None), ast.Load):
            for leaf in node.elts:
                if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str):
                    found.append((leaf.lineno, leaf.value))
    return found


def _names_used_as_values(names: set[str], registry: str) -> list[str]:
    hits = []
    for module, path in MODULES.items():
        if module.startswith(registry):
            continue
        for line, value in _compared_strings(path):
            if value in names:
                hits.append(f"{path.relative_to(PACKAGE)}:{line}: {value!r}")
    return hits


def test_target_kind_names_live_only_in_the_registry():
    from logit_cache.targets import kind_names

    hits = _names_used_as_values(set(kind_names()), "logit_cache.targets")
    assert hits == [], "target-kind names compared or listed outside logit_cache/targets/ (ask the registry):\n" + "\n".join(hits)


def test_backend_names_live_only_in_the_store():
    from logit_cache.store import BACKENDS

    hits = _names_used_as_values(set(BACKENDS), "logit_cache.store")
    assert hits == [], "backend names compared or listed outside logit_cache/store/ (ask store.BACKENDS):\n" + "\n".join(hits)


@pytest.mark.parametrize("old", sorted(_legacy.MOVED))
def test_old_import_paths_still_work(old):
    module = importlib.import_module(f"logit_cache.{old}")
    assert module is importlib.import_module(_legacy.MOVED[old])
    assert inspect.ismodule(module)


def test_the_package_does_not_shadow_its_modules():
    import logit_cache.dump
    import logit_cache.token_losses
    import logit_cache.train

    for name in ("dump", "train", "token_losses"):
        assert inspect.ismodule(getattr(logit_cache, name)), f"logit_cache.{name} is not a module"
        assert callable(getattr(logit_cache, name)), f"logit_cache.{name}(...) no longer works as the old function"
    assert logit_cache.dump.dump_cache is logit_cache.dump_cache
    assert logit_cache.train.train_student is logit_cache.train_student


def test_public_names_resolve():
    missing = [name for name in logit_cache.__all__ if not hasattr(logit_cache, name)]
    assert missing == []
