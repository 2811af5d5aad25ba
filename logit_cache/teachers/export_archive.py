"""Find the parts of a ``torch.export`` ``.pt2`` archive whose loading would run code from the file.

torch documents ``torch.export.load`` as unsafe for untrusted files. Read in torch 2.13's own loader
(``torch/export/__init__.py``, ``torch/export/pt2_archive/_package.py``, ``torch/_export/serde/serialize.py``,
``torch/export/_unlift.py``) and each tried with a hostile archive, these parts run code while an archive
loads or when its program runs; :func:`unsafe_parts` names every one it finds, before torch reads the file:

* **pickles** -- weights and tensor constants marked ``use_pickle`` in ``data/weights/<m>_weights_config.json``
  or ``data/constants/<m>_constants_config.json`` (``torch.load(weights_only=False)``); ``opaque_obj_*``
  constants (``pickle.loads``); ``custom_obj_*`` constants (TorchScript's unpickler); the legacy
  ``data/weights/<m>.pt`` and ``data/constants/<m>.pt``; ``data/sample_inputs/<m>.pt``, which torch unpickles
  fully when a weights-only read fails; and the pre-2.8 layout (a top-level ``version`` member), which torch
  falls back to whenever the archive fails to load, unpickling its ``serialized_*.pt`` members the same way.
* **compiled code** -- anything under ``data/aotinductor/``: ``load_pt2`` loads it as a shared library.
* **Python in the program's JSON** (``models/<m>.json``): ``guards_code`` is ``exec``-ed by ``.module()``;
  ``expr_str`` (symbolic shapes) goes through ``sympy.sympify``, which is ``eval``; pytree specs
  (``in_spec``/``out_spec``) import the modules they name (``collections.defaultdict`` contexts, ``__enum__``
  objects); graph input names and ``forward_arg_names`` are pasted into generated Python source, and so are
  the parts of parameter and buffer names (as ``getattr(self, "...")``); a node ``target`` or an operator
  argument naming any ``torch.``/``operator.``/``math.`` callable (``torch.os.system``...) becomes a call in
  the graph, run with the teacher.

What passes holds tensors as raw bytes, sample inputs that load weights-only, sympy expressions built from
literals and sympy's own constructors, and a graph of torch operators. Archives that ``torch.export.save``
writes for a plain ``nn.Module`` pass. The archive is read with torch's own zip reader
(``torch._C.PyTorchFileReader``), the one ``torch.export.load`` uses, so both see the same members.
"""

from __future__ import annotations

import ast
import builtins
import io
import json
import math
import operator
import re
import zipfile
from collections.abc import Iterator
from typing import IO, Any

import sympy
import torch

try:  # the operators torch's deserializer accepts as symbolic-shape arithmetic (private, stable since 2.1)
    from torch._export.serde.serialize import _SYM_OPS
except ImportError:  # pragma: no cover - a future torch that moves it: accept none, refuse such graphs
    _SYM_OPS = frozenset()

#: Member names as torch 2.13 writes them (``torch.export.pt2_archive.constants``), relative to the root folder.
_MODELS_DIR, _MODELS_SUFFIX = "models/", ".json"
_WEIGHTS_DIR, _CONSTANTS_DIR = "data/weights/", "data/constants/"
_AOTI_DIR = "data/aotinductor/"
#: The calls a symbolic-shape expression may make: sympy's constructors that ``sympy.srepr`` writes and the
#: ``torch.utils._sympy.functions`` classes torch's deserializer puts in scope; only names that are sympy classes
#: in this install are kept (see :func:`_sympy_classes`).
_SYMPY_CONSTRUCTORS = (
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan", "LessThan",
    "GreaterThan", "And", "Or", "Not", "Piecewise",
)  # fmt: skip
_TORCH_SYMPY_FUNCTIONS = (
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
)  # fmt: skip
_SYMPY_NODES = (
    ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.BinOp, ast.UnaryOp, ast.Compare,
    ast.BoolOp, ast.operator, ast.unaryop, ast.cmpop, ast.boolop,
)  # fmt: skip
#: The only strings an expression may hold: a symbol's name, and a float's digits (as ``srepr`` writes them).
_STRING_ARGUMENT = {
    "Symbol": re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z"),
    "Float": re.compile(r"[-+]?(?:[0-9.]+(?:[eE][-+]?[0-9]+)?|inf|nan)\Z"),
}
#: Names that would resolve to something other than a fresh symbol inside ``sympy.sympify`` (its namespace is
#: ``from sympy import *`` plus the builtin functions): a bare one is allowed only if it is a sympy value.
_SYMPY_NAMESPACE = {name: value for name, value in vars(sympy).items() if not name.startswith("_")}


def _sympy_classes() -> frozenset[str]:
    """The names of ``_SYMPY_CONSTRUCTORS`` and ``_TORCH_SYMPY_FUNCTIONS`` that are sympy classes here."""
    from torch.utils._sympy import functions

    found = [getattr(sympy, name, None) for name in _SYMPY_CONSTRUCTORS]
    found += [getattr(functions, name, None) for name in _TORCH_SYMPY_FUNCTIONS]
    names = _SYMPY_CONSTRUCTORS + _TORCH_SYMPY_FUNCTIONS
    return frozenset(name for name, obj in zip(names, found, strict=True) if isinstance(obj, type) and issubclass(obj, sympy.Basic))


_SYMPY_CALLS = _sympy_classes()
#: Keys whose strings are names that torch pastes into generated Python source: they must be identifiers.
_IDENTIFIER_KEYS = frozenset({"name", "as_name", "forward_arg_names"})
#: Dicts keyed by graph value names (the same names as above).
_NAMED_VALUES = frozenset({"tensor_values", "sym_int_values", "sym_float_values", "sym_bool_values", "custom_obj_values"})
#: Keys whose strings torch never turns into code: free-text node metadata, string constants (``repr``-ed).
_FREE_TEXT_KEYS = frozenset({"metadata", "as_string", "as_strings"})
#: At most this many problems are listed in one message; the rest are counted.
_MAX_LISTED = 6


def unsafe_parts(handle: IO[bytes]) -> list[str]:
    """Every part of the archive open in ``handle`` whose loading runs code, as ``"member: why"``; ``[]`` if none.

    ``handle`` is read from the start and left at an arbitrary position. Raises ValueError for an archive that
    cannot be read or parsed as torch would (torch would fail on it too, or fall back to its legacy loader,
    which unpickles): such an archive must not be handed to torch either.

    Example::

        with open("teacher.pt2", "rb") as handle:
            if problems := unsafe_parts(handle):
                raise SystemExit(f"refusing teacher.pt2: {problems}")
            handle.seek(0)
            program = torch.export.load(handle)
    """
    problems: list[str] = []
    handle.seek(0)
    try:
        with zipfile.ZipFile(handle) as archive:  # torch.export.load's legacy fallback opens it this way
            if "version" in archive.namelist():
                problems.append("version: the pre-2.8 torch.export layout, whose serialized_*.pt members torch unpickles")
    except zipfile.BadZipFile as exc:
        raise ValueError(f"not a zip archive ({exc})") from exc
    handle.seek(0)
    try:
        reader = torch._C.PyTorchFileReader(handle)
        names = set(reader.get_all_records())
    except Exception as exc:
        if problems:  # the legacy layout has no root folder, which torch's reader needs: it is refused already
            return problems
        raise ValueError(f"torch's archive reader cannot read it ({_short(str(exc))})") from exc

    def read(name: str) -> bytes:
        return bytes(reader.get_record(name))

    if any(name.startswith(_AOTI_DIR) for name in names):
        problems.append(f"{_AOTI_DIR}: AOTInductor code, which torch loads as a shared library")
    for member in sorted(name for name in names if name.startswith(_MODELS_DIR)):
        model = member[len(_MODELS_DIR) : -len(_MODELS_SUFFIX)]  # as torch derives it, whatever the suffix
        try:
            problems += _payload_problems(read, names, model, "weights")
            problems += _payload_problems(read, names, model, "constants")
            problems += _sample_input_problems(read, names, f"data/sample_inputs/{model}.pt")
            problems += _program_problems(read(member), member)
        except RuntimeError as exc:  # a listed member that cannot be read: a damaged archive
            raise ValueError(f"cannot read its member {member!r} or its data ({_short(str(exc))})") from exc
    return list(dict.fromkeys(problems))  # a name used in several places is one problem


def describe(problems: list[str]) -> str:
    """The problems joined for a one-line message, the first few in full and the rest counted."""
    shown = "; ".join(problems[:_MAX_LISTED])
    return shown + (f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else "")


# --- weights, constants, sample inputs -------------------------------------------------------------


def _payload_problems(read: Any, names: set[str], model: str, kind: str) -> list[str]:
    """Pickled entries of a model's weights or constants (``kind``), and the legacy pickled file."""
    directory = _WEIGHTS_DIR if kind == "weights" else _CONSTANTS_DIR
    legacy = f"{directory}{model}.pt"
    if legacy in names:  # torch reads this instead of the config, and unpickles it
        return [f"{legacy}: {kind} pickled as one Python object (the legacy layout)"]
    config_member = f"{directory}{model}_{kind}_config.json"
    if config_member not in names:
        return []  # torch refuses an archive without it
    try:
        entries = json.loads(read(config_member).decode())["config"]
        items = list(entries.items())
    except Exception as exc:  # torch parses it the same way, so it would fail too; refuse rather than guess
        raise ValueError(f"{config_member} cannot be read ({type(exc).__name__}: {_short(str(exc))})") from exc
    problems = []
    for fqn, entry in items:
        path = entry.get("path_name") if isinstance(entry, dict) else None
        if not isinstance(path, str):
            raise ValueError(f"{config_member} cannot be read (entry {_short(fqn)} has no path_name)")
        member = f"{directory}{path}"
        if kind == "constants" and path.startswith(("custom_obj_", "opaque_obj_")):
            problems.append(f"{member}: constant {fqn!r} is a pickled Python object")
        elif entry.get("use_pickle", False) is not False:
            problems.append(f"{member}: {kind[:-1]} {fqn!r} is pickled (use_pickle)")
        elif not _safe_dotted(fqn):
            problems.append(f"{config_member}: name {_short(fqn)} would be pasted into generated Python source")
    return problems


def _sample_input_problems(read: Any, names: set[str], member: str) -> list[str]:
    """Sample inputs must load weights-only: torch tries that first and unpickles fully only when it fails."""
    if member not in names:
        return []
    data = read(member)
    if not data:
        return []
    try:  # the very call torch makes first: where it succeeds, torch's succeeds and no full unpickling follows
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        why = f"they name {found.group(1)}" if found else f"{type(exc).__name__}: {_short(str(exc))}"
        return [f"{member}: sample inputs that do not load weights-only ({why})"]
    return []


# --- the program's JSON ----------------------------------------------------------------------------


def _program_problems(data: bytes, member: str) -> list[str]:
    """Everything in ``models/<m>.json`` that torch would run, import, or paste into Python source."""
    try:
        program = json.loads(data.decode("utf-8"))  # as torch parses it
    except Exception as exc:
        raise ValueError(f"{member} cannot be read ({type(exc).__name__}: {_short(str(exc))})") from exc
    if not isinstance(program, dict):
        raise ValueError(f"{member} cannot be read (not a JSON object)")
    problems = []
    if program.get("guards_code"):
        problems.append(f"{member}: guards_code holds Python source, which torch runs ({_short(program['guards_code'])})")
    for key, value, parent in _walk(program, None, None):
        why = _value_problem(key, value, parent)
        if why:
            problems.append(f"{member}: {why}")
    return problems


def _walk(value: Any, key: str | None, parent: dict[str, Any] | None) -> Iterator[tuple[str | None, Any, dict[str, Any] | None]]:
    """(key, value, enclosing dict) for every string and every key of a name-keyed dict, skipping free text."""
    if isinstance(value, dict):
        for child_key, child in value.items():
            if child_key in _FREE_TEXT_KEYS:
                continue
            if child_key in _NAMED_VALUES and isinstance(child, dict):
                for name in child:
                    yield "name", name, value
            yield from _walk(child, child_key, value)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item, key, parent)
    elif isinstance(value, str):
        yield key, value, parent


def _value_problem(key: str | None, value: str, parent: dict[str, Any] | None) -> str | None:
    """Why one string of the program would run code, or None."""
    if key == "expr_str":
        return None if _safe_sympy(value) else f"expr_str {_short(value)} is not a plain sympy expression (sympify runs it)"
    if key in ("in_spec", "out_spec"):
        why = _treespec_problem(value)
        return f"{key} {why} (torch would import it)" if why else None
    if key in _IDENTIFIER_KEYS:
        return None if value == "" or value.isidentifier() else f"{key} {_short(value)} would be pasted into generated Python source"
    if key == "as_operator" or (key == "target" and parent is not None and "inputs" in parent):
        return None if _is_torch_operator(value) else f"node target {_short(value)} is not a torch operator (it would be called)"
    if key == "guards_code":
        return None  # reported once, above
    if not _safe_dotted(value):
        return f"{key} {_short(value)} would be pasted into generated Python source"
    return None


def _safe_dotted(value: str) -> bool:
    """A dotted name (``layers.0.weight``) torch may write as ``getattr(self, "<part>")``: no quote, backslash or
    unprintable character can end that string early."""
    return all(char.isprintable() and char not in "\"'\\" for char in value)


def _is_torch_operator(target: str) -> bool:
    """Whether a node target resolves, as torch's deserializer resolves it, to an operator and nothing else."""
    if target.startswith("_operator"):
        obj: Any = operator
    elif target.startswith("torch"):
        obj = torch
    elif target.startswith("math"):
        obj = math
    else:
        return not target.startswith("#")  # unresolved: torch refuses it; "#..." names a registered extension
    for part in target.split(".")[1:]:
        if not hasattr(obj, part):
            return True  # unresolved: torch keeps the string, which is no callable, and refuses the node
        obj = getattr(obj, part)
    if isinstance(obj, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return True
    try:
        return obj in _SYM_OPS
    except TypeError:  # unhashable
        return False


def _treespec_problem(text: str) -> str | None:
    """A pytree spec whose loading imports a module: a defaultdict's factory, or an ``__enum__`` in a context."""
    try:
        _protocol, schema = json.loads(text)
    except Exception:
        return None  # torch fails on it the same way, before importing anything
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        kind, context = node.get("type"), node.get("context")
        if kind == "collections.defaultdict":
            return f"holds a defaultdict, whose factory names a module ({_short(context)})"
        if isinstance(context, str) and kind != "collections.namedtuple":
            enum = _first_enum(context)
            if enum is not None:
                return f"holds an enum, which names a module ({_short(enum)})"
        children = node.get("children_spec")
        if isinstance(children, list):
            stack.extend(children)
    return None


def _first_enum(context: str) -> dict[str, Any] | None:
    """The first ``{"__enum__": ...}`` object in a JSON context (torch's hook imports its ``fqn``), or None."""
    enums: list[dict[str, Any]] = []

    def hook(obj: dict[str, Any]) -> dict[str, Any]:
        if "__enum__" in obj:
            enums.append(obj)
        return obj

    try:
        json.loads(context, object_hook=hook)
    except Exception:
        return None  # torch fails on it the same way, before importing anything
    return enums[0] if enums else None


def _safe_sympy(text: str) -> bool:
    """Whether ``sympy.sympify(text)`` only builds an expression: literals, symbol names and sympy constructors.

    ``sympify`` ``eval``-s its string with the builtins in scope, and sympy's functions ``sympify`` string
    arguments again, so a string is allowed only as a symbol's name or a float's digits, and a call only of
    the constructors in ``_SYMPY_CALLS``.
    """
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    allowed_strings: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, _SYMPY_NODES):
            return False
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_CALLS:
                return False
            if any(k.arg is None or not isinstance(k.value, ast.Constant) or isinstance(k.value.value, str) for k in node.keywords):
                return False
            pattern = _STRING_ARGUMENT.get(node.func.id)
            first = node.args[0] if node.args else None
            if pattern and isinstance(first, ast.Constant) and isinstance(first.value, str) and pattern.match(first.value):
                allowed_strings.add(id(first))
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, (bytes, complex)) or node.value is Ellipsis:
                return False
        elif isinstance(node, ast.Name) and not _safe_name(node.id):
            return False
    strings = [node for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    return all(id(node) in allowed_strings for node in strings)


def _safe_name(name: str) -> bool:
    """A name that becomes a fresh symbol, a sympy value (``oo``, ``pi``, ``true``) or an allowed constructor."""
    if name.startswith("_") or name in vars(builtins):
        return False
    if name in _SYMPY_CALLS or name not in _SYMPY_NAMESPACE:
        return True
    return isinstance(_SYMPY_NAMESPACE[name], sympy.Basic)


def _short(value: Any) -> str:
    """A value for a one-line message: its repr, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
