"""SIGTERM / SIGHUP as exceptions, so that a launcher's teardown runs (``fedvit run``, a sweep's
parent): :func:`signals_raise` raises them at once, :func:`deferred_signals` holds them (and
Ctrl-C) until a block that must not be cut short is done."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Terminated(SystemExit):
    """SIGTERM / SIGHUP turned into an exception: exit status ``128 + signal``."""


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM / SIGHUP raise :class:`Terminated` meanwhile (main thread only; elsewhere nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        raise Terminated(128 + signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP until the block is done (a teardown must not be cut short).

    A signal that came meanwhile is raised afterwards (``KeyboardInterrupt`` or
    :class:`Terminated`), unless an exception is on its way out already.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {sig: signal.signal(sig, lambda signum, _frame: pending.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if pending:
        if pending[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(128 + pending[0])
