"""What a client worker process reuses between messages.

In Flower's simulation one worker process (a Ray actor) handles the messages of many clients, one
after the other; a SuperNode's ClientApp process may also handle several. Building the model,
resolving the config and loading a client's data indices for every message cost far more than a
small client's actual work (issue 14: ~30 ms per message at 1,000 clients). This module keeps them:

* :class:`ModelPool` — one built model per configuration. :meth:`ModelPool.acquire` hands it out
  **pristine**: every parameter and buffer back at its seeded initial value, gradients dropped,
  ``requires_grad`` flags, train/eval mode and plain attributes (ints, floats, strings ...) of
  every module as built. A model whose module tree or parameter objects were replaced is thrown
  away and rebuilt, so no state of one client or run can reach another. A model still in use
  (re-entrant call) is never handed out twice: a fresh one is built.
* :func:`cached` — a small LRU per purpose (datasets of a client, fingerprints), keyed by
  everything that shapes the value: the run config, the client id, the data path and the data
  files' identity (size, mtime), so a changed file is reloaded.

Private state is *not* cached here: it is read from the client's
:class:`~fedvit.state.PrivateStore` for every message, exactly as before, so a restarted worker
still finds it.

:func:`traced` records each message's wall and CPU time when :data:`TRACE_ENV` names a directory
(``fedvit bench round`` sets it to tell idle workers from busy ones and busy ones from slow ones).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")

_SIMPLE = (bool, int, float, str, type(None), tuple, frozenset)


class _Snapshot:
    """The pristine state of a freshly built model (see :meth:`ModelPool.acquire`)."""

    def __init__(self, model: nn.Module) -> None:
        self.tree = self._tree(model)
        self.tensors = [(t, t.detach().clone()) for t in self._tensors(model)]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.attrs = [
            (m, {k: v for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, _SIMPLE)})
            for m in model.modules()
        ]

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return list(model.state_dict(keep_vars=True).values())

    @staticmethod
    def _tree(model: nn.Module) -> tuple[tuple[str, int], ...]:
        modules = tuple((name, id(m)) for name, m in model.named_modules())
        tensors = tuple((name, id(t)) for name, t in model.state_dict(keep_vars=True).items())
        return modules + tensors

    def intact(self, model: nn.Module) -> bool:
        """The model still has the module tree and tensor objects it was built with."""
        return self._tree(model) == self.tree

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, initial in self.tensors:
                tensor.copy_(initial)
                if isinstance(tensor, nn.Parameter):
                    tensor.grad = None
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for module, attrs in self.attrs:
            extra = [
                k
                for k, v in vars(module).items()
                if not k.startswith("_") and k not in attrs and isinstance(v, _SIMPLE)
            ]
            for k in extra:  # an attribute a client added: not part of the pristine model
                delattr(module, k)
            for k, v in attrs.items():
                setattr(module, k, v)


class ModelPool:
    """Pristine models of one configuration, built by ``build`` (see the module docstring)."""

    def __init__(self, build: Callable[[], nn.Module]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._idle: list[tuple[nn.Module, _Snapshot]] = []
        self._busy: dict[int, _Snapshot] = {}
        self.builds = 0  # how many models this pool built (tests and diagnostics)

    def acquire(self) -> nn.Module:
        """A model in its freshly built state; give it back with :meth:`release`."""
        with self._lock:
            while self._idle:
                model, snap = self._idle.pop()
                if snap.intact(model):
                    snap.restore()
                    self._busy[id(model)] = snap
                    return model
            self.builds += 1
        model = self._build()
        snap = _Snapshot(model)
        with self._lock:
            self._busy[id(model)] = snap
        return model

    def release(self, model: nn.Module) -> None:
        """Return ``model``; it is reset when next acquired (a replaced tree is dropped then)."""
        with self._lock:
            snap = self._busy.pop(id(model), None)
            if snap is not None:
                self._idle.append((model, snap))


class LRU:
    """A small thread-safe least-recently-used map."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_make(self, key: Hashable, make: Callable[[], T]) -> T:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = make()
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_CACHES: dict[str, LRU] = {}
_SIZES = {"datasets": 4096, "pools": 4, "splits": 8, "fingerprints": 64}


def cache(name: str) -> LRU:
    """The process-wide LRU named ``name`` (``datasets``, ``pools``, ``splits``, ``fingerprints``)."""
    if name not in _CACHES:
        _CACHES[name] = LRU(_SIZES.get(name, 64))
    return _CACHES[name]


def cached(name: str, key: Hashable, make: Callable[[], T]) -> T:
    """``make()`` once per ``key`` in the process-wide cache ``name``."""
    return cache(name).get_or_make(key, make)


def clear() -> None:
    """Forget everything cached in this process (tests; a worker that must start cold)."""
    for c in _CACHES.values():
        c.clear()


#: Environment variable naming a directory: each worker process appends one JSON line per message
#: to ``<dir>/<pid>.jsonl`` (off when unset).
TRACE_ENV = "FEDVIT_TRACE_DIR"


@contextmanager
def traced(kind: str, client_id: int | None, server_round: int | None) -> Iterator[None]:
    """Time one message's handling in this process: ``{"pid", "kind", "client", "round", "t0", "t1",
    "cpu_s"}`` (``t0``/``t1``: ``time.time()``; ``cpu_s``: this process's CPU seconds in between,
    so ``t1 - t0 - cpu_s`` is time the worker waited: for a core, for the disk, or asleep)."""
    directory = os.environ.get(TRACE_ENV)
    if not directory:
        yield
        return
    t0, c0 = time.time(), time.process_time()
    try:
        yield
    finally:
        record = {
            "pid": os.getpid(),
            "kind": kind,
            "client": client_id,
            "round": server_round,
            "t0": t0,
            "t1": time.time(),
            "cpu_s": time.process_time() - c0,
        }
        with open(os.path.join(directory, f"{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
