"""Read a class out of a project module without running the module's heavy imports.

A method module (``strategies/fedtp.py``) imports torch and flwr at its top, but the ``Options``
dataclass it declares for ``method.options`` needs only ``dataclasses`` and a few constants.
:func:`load_class` returns such a class by executing, from the module's source, only the
top-level statements it depends on (found with :mod:`ast`): its own definition, the constants,
functions and classes its body names, and the imports those need. A name imported from another
project module (``fedvit``, ``strategies``, ``clients``) is read the same way from that module, so
``from fedvit.robust import AGGREGATORS`` costs a tuple, not flwr. A base class written as
``OtherClass.Options`` reads only that nested class of ``OtherClass``.

What comes back is a *copy* of the class (same source, same behaviour, another identity), for
checking configurations before anything runs; code that builds the method uses the real class
(:func:`fedvit.registry.method_options`). A module that is already imported is not re-read: its
real class is returned. Anything this reader cannot follow (a name bound by a statement it does
not handle, a failure while executing) raises :class:`LightLoadError`;
:func:`fedvit.registry.option_schema` then imports the module for real, so the result is the same,
only slower. ``tests/test_registry.py`` checks that every registered method's options are read
without that fallback and match the real classes.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import fedvit.errors  # noqa: F401 - imported for real, so copies raise the real ConfigError

#: Top-level packages read from source; anything else is imported normally (stdlib, dataclasses ...).
PROJECT_PACKAGES = ("fedvit", "strategies", "clients")
_PREFIX = "fedvit._light."  # the light namespaces' names in sys.modules


class LightLoadError(RuntimeError):
    """The class cannot be read without importing its module."""


class _NoSuchAttr(LightLoadError):
    """A class neither defines nor inherits (from a project base) the nested class asked for."""


@dataclass
class _Source:
    name: str
    path: Path
    tree: ast.Module
    defs: dict[str, int]  # top-level name -> index of the statement binding it (last binding wins)
    done: set[int] = field(default_factory=set)  # statements already run in ``module``
    classes: dict[tuple[str, ...], Any] = field(default_factory=dict)  # (class, nested...) -> read class
    module: types.ModuleType | None = None


def _bound_names(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        return [stmt.name]
    if isinstance(stmt, ast.Import | ast.ImportFrom):
        return [(a.asname or a.name).split(".")[0] for a in stmt.names if a.name != "*"]
    targets: list[ast.expr] = []
    if isinstance(stmt, ast.Assign):
        targets = list(stmt.targets)
    elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
        targets = [stmt.target]
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


@cache
def _source(module: str) -> _Source:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise LightLoadError(f"no Python source for module '{module}'")
    path = Path(spec.origin)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    defs: dict[str, int] = {}
    for i, stmt in enumerate(tree.body):
        for name in _bound_names(stmt):
            defs[name] = i
    return _Source(module, path, tree, defs)


def _is_project(module: str) -> bool:
    return module.split(".")[0] in PROJECT_PACKAGES


def _names_used(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _attribute_uses(node: ast.AST, name: str) -> set[str] | None:
    """The attributes ``name.<attr>`` read in ``node``, or ``None`` if ``name`` is also used bare."""
    attrs: set[str] = set()
    parents = {id(child): parent for parent in ast.walk(node) for child in ast.iter_child_nodes(parent)}
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load):
            parent = parents.get(id(n))
            if not (isinstance(parent, ast.Attribute) and parent.value is n):
                return None
            attrs.add(parent.attr)
    return attrs


def _absolute(src: _Source, stmt: ast.ImportFrom) -> str:
    if not stmt.level:
        return stmt.module or ""
    package = src.name.rsplit(".", stmt.level)[0]
    return f"{package}.{stmt.module}" if stmt.module else package


def _load_name(module: str, name: str) -> Any:
    """Top-level ``name`` of project ``module``: the real object if the module is imported,
    else read from source."""
    real = sys.modules.get(module)
    if real is not None:
        return getattr(real, name)
    src = _source(module)
    if name not in src.defs:
        submodule = f"{module}.{name}"
        if importlib.util.find_spec(submodule) is not None:  # `from package import submodule`
            raise LightLoadError(f"'{submodule}' is a module; not read from source")
        raise LightLoadError(f"'{module}' has no top-level '{name}'")
    index = src.defs[name]
    stmt = src.tree.body[index]
    if isinstance(stmt, ast.ClassDef):
        return _load_class_node(src, stmt, ())
    if index in src.done:
        return _module(src).__dict__[name]
    return _execute(src, [stmt], {name})[name]


def _load_class_node(src: _Source, cls: ast.ClassDef, nested: tuple[str, ...]) -> Any:
    """Class ``cls`` of ``src`` (top-level) or its nested class at path ``nested``."""
    key = (cls.name, *nested)
    if key in src.classes:
        return src.classes[key]
    node, qualname = cls, cls.name
    for i, part in enumerate(nested):
        inner = next((s for s in node.body if isinstance(s, ast.ClassDef) and s.name == part), None)
        if inner is None:
            return _inherited(src, node, part, nested[i + 1 :])
        node, qualname = inner, f"{qualname}.{part}"
    src.classes[key] = _execute(src, [node], {node.name}, qualname=qualname)[node.name]
    return src.classes[key]


def _inherited(src: _Source, cls: ast.ClassDef, attr: str, rest: tuple[str, ...]) -> Any:
    """``cls.<attr>`` when ``cls`` does not define it: looked up in its project bases, in order."""
    for base in cls.bases:
        owner, path = _base_owner(src, base)
        if owner is None:
            continue
        module, name = owner
        real = sys.modules.get(module)
        if real is not None:  # the real base class: its attributes follow its whole MRO
            found = getattr(real, name)
            for part in (*path, attr, *rest):
                found = getattr(found, part, None)
            if found is not None:
                return found
            continue
        base_src = _source(module)
        base_stmt = base_src.tree.body[base_src.defs[name]] if name in base_src.defs else None
        if not isinstance(base_stmt, ast.ClassDef):
            raise LightLoadError(f"base '{name}' of '{cls.name}' is not a class of '{module}'")
        try:
            return _load_class_node(base_src, base_stmt, (*path, attr, *rest))
        except _NoSuchAttr:
            continue
    raise _NoSuchAttr(f"'{cls.name}' has no '{attr}'")


def _base_owner(src: _Source, base: ast.expr) -> tuple[tuple[str, str] | None, tuple[str, ...]]:
    """(module, top-level name) a base expression refers to, and the attribute path after it;
    ``None`` for a base outside the project (it is assumed not to declare the attribute)."""
    path: list[str] = []
    while isinstance(base, ast.Attribute):
        path.insert(0, base.attr)
        base = base.value
    if not isinstance(base, ast.Name) or base.id not in src.defs:
        return None, ()
    stmt = src.tree.body[src.defs[base.id]]
    if isinstance(stmt, ast.ClassDef):
        return (src.name, base.id), tuple(path)
    if isinstance(stmt, ast.ImportFrom):
        alias = next(a for a in stmt.names if (a.asname or a.name) == base.id)
        module = _absolute(src, stmt)
        if _is_project(module):
            return (module, alias.name), tuple(path)
    return None, ()


def _module(src: _Source) -> types.ModuleType:
    """The namespace ``src``'s statements are executed in, registered in ``sys.modules`` (under
    a private name) because dataclasses and ``typing.get_type_hints`` look annotations up there."""
    if src.module is None:
        src.module = types.ModuleType(_PREFIX + src.name)
        src.module.__dict__.update({"__file__": str(src.path), "__builtins__": builtins})
        sys.modules[src.module.__name__] = src.module
    return src.module


def _execute(src: _Source, targets: list[ast.stmt], wanted: set[str], qualname: str | None = None) -> Any:
    """Run ``targets`` (statements of ``src``; a nested class is run as if top-level) after the
    top-level statements they need, in ``src``'s light namespace; returns the namespace."""
    module = _module(src)
    needed: dict[int, ast.stmt] = {}
    bound: dict[str, Any] = {}  # names given without running their statement
    stand_ins: set[str] = set()
    pending, seen = list(targets), set()
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for name in sorted(_names_used(node)):
            index = src.defs.get(name)
            if index is None or index in src.done or index in needed:
                continue
            stmt = src.tree.body[index]
            if any(stmt is t for t in targets):
                continue
            attrs = _attribute_uses(node, name)
            if name in stand_ins:  # so far read as `name.<nested class>` only
                if attrs is not None and attrs <= set(vars(bound[name])):
                    continue
                del bound[name]  # used otherwise here: resolved in full below
                stand_ins.discard(name)
            elif name in bound:
                continue
            stand_in = _stand_in(src, stmt, name, attrs)
            if stand_in is not None:  # only `Other.Options` is read: not the whole class
                bound[name] = stand_in
                stand_ins.add(name)
            elif isinstance(stmt, ast.ImportFrom) and _is_project(_absolute(src, stmt)):
                alias = next(a for a in stmt.names if (a.asname or a.name) == name)
                bound[name] = _load_name(_absolute(src, stmt), alias.name)
            else:
                needed[index] = stmt
                pending.append(stmt)
    module.__dict__.update({k: v for k, v in bound.items() if k not in module.__dict__})
    future = [s for s in src.tree.body if isinstance(s, ast.ImportFrom) and s.module == "__future__"]
    body = [needed[i] for i in sorted(needed) if needed[i] not in future]
    renamed = []
    for target in targets:
        if isinstance(target, ast.ClassDef) and target in src.tree.body:
            renamed.append(target)
        elif isinstance(target, ast.ClassDef):  # nested: run under a private top-level name
            copy = ast.ClassDef(**{f: getattr(target, f) for f in target._fields})
            copy.name = f"_light_{(qualname or target.name).replace('.', '_')}"
            ast.copy_location(copy, target)
            renamed.append(copy)
        else:
            renamed.append(target)
    try:
        code = compile(ast.Module(body=[*future, *body, *renamed], type_ignores=[]), str(src.path), "exec")
        exec(code, module.__dict__)  # the project's own source: a subset of its statements
    except Exception as err:
        raise LightLoadError(f"reading {', '.join(sorted(wanted))} of '{src.name}' failed: {err!r}") from err
    src.done.update(needed)
    src.done.update(i for i, stmt in enumerate(src.tree.body) if any(stmt is t for t in targets))
    result = {}
    for target, run in zip(targets, renamed, strict=True):
        if isinstance(target, ast.ClassDef):
            obj = module.__dict__[run.name]
            if run is not target:
                obj.__name__, obj.__qualname__ = target.name, qualname or target.name
            result[target.name] = obj
    for name in wanted:
        result.setdefault(name, module.__dict__.get(name))
    return result


def _stand_in(src: _Source, stmt: ast.stmt, name: str, attrs: set[str] | None) -> Any:
    """A namespace with the nested classes ``name.<attr>`` when ``name`` (a project class) is only
    used that way; ``None`` otherwise (an enum member, a bare use: the statement runs)."""
    if not attrs or not isinstance(stmt, ast.ClassDef | ast.ImportFrom):
        return None
    if isinstance(stmt, ast.ImportFrom) and not _is_project(_absolute(src, stmt)):
        return None
    try:
        return types.SimpleNamespace(**{a: _nested(src, stmt, name, a) for a in sorted(attrs)})
    except _NoSuchAttr:
        return None


def _nested(src: _Source, stmt: ast.stmt, name: str, attr: str) -> Any:
    if isinstance(stmt, ast.ClassDef):
        return _load_class_node(src, stmt, (attr,))
    assert isinstance(stmt, ast.ImportFrom)
    alias = next(a for a in stmt.names if (a.asname or a.name) == name)
    module = _absolute(src, stmt)
    if not _is_project(module):
        raise LightLoadError(f"'{name}.{attr}' comes from '{module}', outside the project")
    real = sys.modules.get(module)
    if real is not None:
        return getattr(getattr(real, alias.name), attr)
    base_src = _source(module)
    base_stmt = base_src.tree.body[base_src.defs[alias.name]]
    if not isinstance(base_stmt, ast.ClassDef):
        raise LightLoadError(f"'{module}.{alias.name}' is not a class")
    return _load_class_node(base_src, base_stmt, (attr,))


@cache
def load_class(module: str, qualname: str) -> Any:
    """The class ``qualname`` (``"Outer"`` or ``"Outer.Inner"``) of project ``module``, read from
    source without the module's other imports; the real class when the module is imported.
    ``None`` when a nested class is neither defined nor inherited from a project base."""
    outer, *nested = qualname.split(".")
    real = sys.modules.get(module)
    if real is not None:
        obj = getattr(real, outer)
        for part in nested:
            obj = getattr(obj, part, None)
        return obj
    src = _source(module)
    stmt = src.tree.body[src.defs[outer]] if outer in src.defs else None
    if not isinstance(stmt, ast.ClassDef):
        raise LightLoadError(f"'{module}' has no top-level class '{outer}'")
    try:
        return _load_class_node(src, stmt, tuple(nested))
    except _NoSuchAttr:
        return None
