"""Name -> class registry for strategies (server side) and clients (client side), loaded lazily.

A method is one YAML in ``conf/method/`` naming its private groups, a strategy and a client.
Strategy and client classes declare themselves with :func:`register_strategy` /
:func:`register_client` in a module of the ``strategies`` / ``clients`` package, so a new method
touches one strategy, one client and one YAML. Finding them imports nothing: :func:`declared`
reads those decorators from the packages' source (name -> ``module:Class``), and
:func:`get_strategy` / :func:`get_client` import the one module that declares the name. So a
client worker imports only its method's client module and the ServerApp only its strategy
module. A class registered by a module imported some other way (a test, a plugin elsewhere) is
found too.

Method-specific knobs live in ``method.options`` and are **typed**: a strategy or client class
declares a dataclass ``Options`` (class attribute). :func:`method_options` splits
``method.options`` between the two schemas, type-checks each part and refuses keys that
neither knows, naming them (``method.options.<key>``); it returns instances of the real
classes. :func:`check_method_options` (what :func:`fedvit.config.load_config` calls) does the
same checks against the ``Options`` classes read from source by :mod:`fedvit.lightload`, so a
configuration is checked without importing torch or flwr.

A method may also bring its own ``fedvit`` subcommands (pFedLA's ``fedvit alpha``): a function
``(argv) -> exit code`` decorated with :func:`register_command` in either package, found the same
way (:func:`declared` ``("command")``, with its help line) and imported by :func:`run_command` only
when that subcommand runs (:mod:`fedvit.cli.plugins`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import logging
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from fedvit.errors import ConfigError

T = TypeVar("T")
PACKAGES = {"strategy": "strategies", "client": "clients"}
#: Where each kind is declared: classes in their own package, a method's commands in either.
_SEARCHED = {"strategy": ("strategies",), "client": ("clients",), "command": ("strategies", "clients")}
_DECORATORS = {"register_strategy": "strategy", "register_client": "client", "register_command": "command"}
_REGISTERED: dict[str, dict[str, Any]] = {"strategy": {}, "client": {}, "command": {}}


class Declaration(NamedTuple):
    """Where a strategy or client class (or a method's command) is declared: ``module:qualname``;
    a command's help line too."""

    module: str
    qualname: str
    help: str = ""

    def __str__(self) -> str:
        return f"{self.module}:{self.qualname}"


def _register(kind: str, name: str) -> Callable[[T], T]:
    table = _REGISTERED.setdefault(kind, {})

    def deco(cls: T) -> T:
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} '{name}' is registered twice ({table[name]} and {cls})")
        table[name] = cls
        return cls

    return deco


def register_strategy(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a strategy available as ``method.strategy: <name>``."""
    return _register("strategy", name)


def register_client(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a client available as ``method.client: <name>``."""
    return _register("client", name)


def register_command(name: str, *, help: str) -> Callable[[T], T]:
    """Function decorator: a method's own subcommand, ``fedvit <name>`` (or ``fedvit bench <word>``
    for ``name="bench <word>"``), listed by ``fedvit --help`` with ``help``. The function takes
    the arguments after the name (``argv: list[str]``, its own ``argparse`` parser) and returns
    the exit code. ``name`` and ``help`` are read from source, so both must be string literals."""
    del help  # read from source by declared("command")
    return _register("command", name)


def _package_files(package: str) -> list[Path]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.py"))


@cache
def _scan(package: str) -> dict[str, dict[str, Declaration]]:
    """Every ``@register_*("name")`` decorator of ``package``'s modules, by kind (read, not imported)."""
    found: dict[str, dict[str, Declaration]] = {}
    for path in _package_files(package):
        text = path.read_text(encoding="utf-8")
        if "register_" not in text:
            continue
        module = f"{package}.{path.stem}" if path.stem != "__init__" else package
        for stmt in ast.parse(text, filename=str(path)).body:
            if not isinstance(stmt, ast.ClassDef | ast.FunctionDef):
                continue
            for deco in stmt.decorator_list:
                name, kind = _literal_arg(deco, 0), _decorator_kind(deco)
                if kind is None or name is None or isinstance(stmt, ast.ClassDef) == (kind == "command"):
                    continue
                table = found.setdefault(kind, {})
                if name in table:
                    raise ValueError(f"{kind} '{name}' is declared twice ({table[name]} and {module})")
                table[name] = Declaration(module, stmt.name, _literal_arg(deco, "help") or "")
    return found


def _decorator_kind(deco: ast.expr) -> str | None:
    is_call = isinstance(deco, ast.Call) and isinstance(deco.func, ast.Name)
    return _DECORATORS.get(deco.func.id) if is_call else None  # type: ignore[union-attr]


def _literal_arg(deco: ast.expr, which: int | str) -> str | None:
    """A decorator call's string-literal argument (position or keyword), else ``None``."""
    if not isinstance(deco, ast.Call):
        return None
    if isinstance(which, int):
        node = deco.args[which] if len(deco.args) > which else None
    else:
        node = next((k.value for k in deco.keywords if k.arg == which), None)
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


@cache
def declared(kind: str) -> dict[str, Declaration]:
    """Every ``@register_<kind>("name")`` of the ``strategies`` / ``clients`` package (``command``:
    of both), read from source (nothing is imported): name -> where it is."""
    found: dict[str, Declaration] = {}
    for package in _SEARCHED[kind]:
        for name, where in _scan(package).get(kind, {}).items():
            if name in found:
                raise ValueError(f"{kind} '{name}' is declared twice ({found[name]} and {where.module})")
            found[name] = where
    return found


def names(kind: str) -> list[str]:
    """Every strategy or client name: declared in the packages or registered otherwise."""
    return sorted({*declared(kind), *_REGISTERED.setdefault(kind, {})})


def _lookup(kind: str, name: str) -> Any:
    table = _REGISTERED.setdefault(kind, {})
    if name not in table:
        where = declared(kind).get(name)
        if where is None:
            raise KeyError(f"unknown {kind} '{name}'; registered: {names(kind)}")
        module = importlib.import_module(where.module)
        if name not in table:  # imported before this table existed (a reset registry)
            cls = getattr(module, where.qualname, None)
            if not (isinstance(cls, type) or (kind == "command" and callable(cls))):
                raise RuntimeError(f"importing {where.module} did not register {kind} '{name}'")
            table[name] = cls
    return table[name]


def _all(kind: str) -> dict[str, type]:
    for name in declared(kind):
        _lookup(kind, name)
    return dict(_REGISTERED[kind])


def strategies() -> dict[str, type]:
    """Every strategy class by name (imports every strategy module; :func:`names` does not)."""
    return _all("strategy")


def clients() -> dict[str, type]:
    """Every client class by name (imports every client module; :func:`names` does not)."""
    return _all("client")


def get_strategy(name: str) -> Any:
    """The strategy class registered as ``name``; imports only the module that declares it."""
    return _lookup("strategy", name)


def get_client(name: str) -> Any:
    """The client class registered as ``name``; imports only the module that declares it."""
    return _lookup("client", name)


def run_command(name: str, argv: list[str]) -> int:
    """Run the method command ``name`` (see :func:`register_command`) on ``argv``: imports only
    the module that declares it."""
    return int(_lookup("command", name)(argv))


def option_schema(kind: str, name: str) -> type | None:
    """The ``Options`` dataclass of strategy or client ``name`` (``None`` if it has none), read from
    source when its module is not imported (:mod:`fedvit.lightload`; a copy of the real class)."""
    from fedvit.lightload import LightLoadError, load_class

    if name in _REGISTERED[kind]:
        return getattr(_REGISTERED[kind][name], "Options", None)
    where = declared(kind).get(name)
    if where is None:
        raise KeyError(f"unknown {kind} '{name}'; registered: {names(kind)}")
    try:
        return load_class(where.module, f"{where.qualname}.Options")
    except LightLoadError as err:  # same answer, by importing the module
        logging.getLogger("fedvit").debug("options of %s '%s' read by import: %s", kind, name, err)
        return getattr(_lookup(kind, name), "Options", None)


def option_error(key: str, message: str) -> Exception:
    """The one error for a bad ``method.options.<key>`` (raise it from an ``Options.__post_init__``)."""
    return ConfigError(f"key 'method.options.{key}': {message}")


def _schema_fields(schema: type | None) -> set[str]:
    return {f.name for f in dataclasses.fields(schema)} if schema is not None else set()


def _typed(schema: type | None, values: dict[str, Any], role: str, owner: str) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if schema is None:
        return None
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as err:
        key = getattr(err, "key", None) or getattr(err, "full_key", "")
        raise ConfigError(f"key 'method.options.{key}': {str(err).splitlines()[0]} ({role} {owner})") from err


def _options(method: Any, client_schema: type | None, strategy_schema: type | None) -> tuple[Any, Any]:
    options = dict(method.options)
    client_keys, strategy_keys = _schema_fields(client_schema), _schema_fields(strategy_schema)
    unknown = sorted(set(options) - client_keys - strategy_keys)
    if unknown:
        raise ConfigError(
            f"key 'method.options.{unknown[0]}': not an option of client '{method.client}' or strategy "
            f"'{method.strategy}'; known: {sorted(client_keys | strategy_keys)}"
        )
    client = {k: v for k, v in options.items() if k in client_keys}
    strategy = {k: v for k, v in options.items() if k in strategy_keys}
    return (
        _typed(client_schema, client, "client", f"'{method.client}'"),
        _typed(strategy_schema, strategy, "strategy", f"'{method.strategy}'"),
    )


def method_options(cfg: Any) -> tuple[Any, Any]:
    """(client options, strategy options) of ``cfg.method``: typed instances of each class's
    ``Options`` dataclass (``None`` for a class without options). Imports both classes' modules."""
    method = cfg.method
    client_cls, strategy_cls = get_client(method.client), get_strategy(method.strategy)
    return _options(method, getattr(client_cls, "Options", None), getattr(strategy_cls, "Options", None))


def check_method_options(method: Any) -> None:
    """Raise :class:`ConfigError` where :func:`method_options` would for the ``method`` section
    (``cfg.method``), importing neither class's module."""
    _options(method, option_schema("client", method.client), option_schema("strategy", method.strategy))
