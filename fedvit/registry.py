"""Name -> class registry for strategies (server side) and clients (client side).

A method is one YAML in ``conf/method/`` naming its private groups, a strategy and a client.
Strategy and client classes register themselves with :func:`register_strategy` /
:func:`register_client`; every module of the ``strategies`` and ``clients`` packages is
imported on first lookup, so a new method touches one strategy, one client and one YAML.

Method-specific knobs live in ``method.options`` and are **typed**: a strategy or client class
declares a dataclass ``Options`` (class attribute); :func:`method_options` splits
``method.options`` between the two schemas, type-checks each part and refuses keys that
neither knows, naming them (``method.options.<key>``).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, TypeVar

from fedvit.errors import ConfigError

T = TypeVar("T")
_STRATEGIES: dict[str, type] = {}
_CLIENTS: dict[str, type] = {}
_discovered = False


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[type[T]], type[T]]:
    def deco(cls: type[T]) -> type[T]:
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} '{name}' is registered twice ({table[name]} and {cls})")
        table[name] = cls
        return cls

    return deco


def register_strategy(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a strategy available as ``method.strategy: <name>``."""
    return _register(_STRATEGIES, "strategy", name)


def register_client(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a client available as ``method.client: <name>``."""
    return _register(_CLIENTS, "client", name)


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    for package_name in ("strategies", "clients"):
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package_name}.{info.name}")
    _discovered = True


def strategies() -> dict[str, type]:
    """Every registered strategy class by name."""
    _discover()
    return dict(_STRATEGIES)


def clients() -> dict[str, type]:
    """Every registered client class by name."""
    _discover()
    return dict(_CLIENTS)


def get_strategy(name: str) -> Any:
    table = strategies()
    if name not in table:
        raise KeyError(f"unknown strategy '{name}'; registered: {sorted(table)}")
    return table[name]


def get_client(name: str) -> Any:
    table = clients()
    if name not in table:
        raise KeyError(f"unknown client '{name}'; registered: {sorted(table)}")
    return table[name]


def option_error(key: str, message: str) -> Exception:
    """The one error for a bad ``method.options.<key>`` (raise it from an ``Options.__post_init__``)."""
    return ConfigError(f"key 'method.options.{key}': {message}")


def _schema_fields(cls: type) -> set[str]:
    schema = getattr(cls, "Options", None)
    return {f.name for f in dataclasses.fields(schema)} if schema is not None else set()


def _typed(cls: type, values: dict[str, Any], role: str) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = getattr(cls, "Options", None)
    if schema is None:
        return None
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as err:
        key = getattr(err, "key", None) or getattr(err, "full_key", "")
        raise ConfigError(
            f"key 'method.options.{key}': {str(err).splitlines()[0]} ({role} {cls.__name__})"
        ) from err


def method_options(cfg: Any) -> tuple[Any, Any]:
    """(client options, strategy options) of ``cfg.method``: typed instances of each class's
    ``Options`` dataclass (``None`` for a class without options)."""
    client_cls, strategy_cls = get_client(cfg.method.client), get_strategy(cfg.method.strategy)
    options = dict(cfg.method.options)
    client_keys, strategy_keys = _schema_fields(client_cls), _schema_fields(strategy_cls)
    unknown = sorted(set(options) - client_keys - strategy_keys)
    if unknown:
        raise ConfigError(
            f"key 'method.options.{unknown[0]}': not an option of client '{cfg.method.client}' or strategy "
            f"'{cfg.method.strategy}'; known: {sorted(client_keys | strategy_keys)}"
        )
    return (
        _typed(client_cls, {k: v for k, v in options.items() if k in client_keys}, "client"),
        _typed(strategy_cls, {k: v for k, v in options.items() if k in strategy_keys}, "strategy"),
    )
