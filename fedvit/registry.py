"""Name -> class registry for strategies (server side) and clients (client side).

A method is one YAML in ``conf/method/`` naming its private groups, a strategy and a client.
Strategy and client classes register themselves with :func:`register_strategy` /
:func:`register_client`; every module of the ``strategies`` and ``clients`` packages is
imported on first lookup, so a new method touches one strategy, one client and one YAML.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, TypeVar

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
