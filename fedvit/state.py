"""Persistent private state of a client; :class:`PrivateStore` alone knows the directory's layout.

Private parameters never leave the client. They are always written to the client's state
directory (atomically, :mod:`fedvit.io`), so a real device keeps its personal model across
rounds, SuperNode restarts and runs. When they are small (``clients.context_state_max_mb``) they
are also cached in Flower's ``context.state``, which Flower drops silently above ~100 MB and on
SuperNode restarts.

The directory holds ``private.npz`` (the arrays) and ``meta.json`` (their names and shapes,
and the model/method fingerprint, :func:`store_fingerprint`), so a state directory written by a
different model or method is refused with a clear message instead of being half-loaded. A
device's own ``state-dir`` keeps one such directory per (method, model, dataset)
(:func:`store_subdir`); :meth:`PrivateStore.locate` finds a client's store from either.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedvit import io
from fedvit.wire import to_numpy, to_record

if TYPE_CHECKING:
    from fedvit.config import FedvitConfig

CONTEXT_KEY = "fedvit.private"
ARRAYS_FILE, META_FILE = "private.npz", "meta.json"
FILE_MODE = 0o600  # private parameters: readable by the owner alone


class StateError(ValueError):
    """A state directory that cannot be used for this client."""


def default_state_dir(run_key: str, client_id: int) -> Path:
    """``$FEDVIT_STATE_DIR`` or ``~/.cache/fedvit/state``, then ``<run-key>/client-<id>``
    (``run-key`` = the run name plus a per-run suffix, kept when a run resumes)."""
    root = Path(os.environ.get("FEDVIT_STATE_DIR", Path.home() / ".cache" / "fedvit" / "state"))
    return root / run_key / f"client-{client_id}"


def store_subdir(cfg: FedvitConfig) -> str:
    """The folder of a device's ``state-dir`` that holds its state for ``cfg``: a device keeps one
    personal model per (method, model, dataset) across runs."""
    return f"{cfg.method.name}-{cfg.model.name}-{cfg.data.name}"


def store_fingerprint(cfg: FedvitConfig, private_shapes: Mapping[str, tuple[int, ...]]) -> str:
    """What a store's ``meta.json`` records of the model and method whose private arrays it holds."""
    from fedvit.config import fingerprint, to_dict

    return fingerprint({"method": cfg.method.name, "model": to_dict(cfg)["model"], "private": private_shapes})


class PrivateStore:
    """Load and save one client's private arrays."""

    def __init__(
        self,
        state_dir: Path,
        fingerprint: str,
        context_state: RecordDict | None = None,
        context_max_bytes: int = 32 * 2**20,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.fingerprint = fingerprint
        self.context_state = context_state
        self.context_max_bytes = context_max_bytes

    @classmethod
    def locate(cls, state_dir: str | Path, cfg: FedvitConfig, fingerprint: str) -> PrivateStore:
        """The store a client of ``cfg`` saved to under ``state_dir``: the directory itself, or its
        :func:`store_subdir` (``state_dir`` is then a device's ``state-dir``). Disk only; raises
        :class:`StateError` when neither holds saved arrays."""
        state_dir = Path(state_dir).expanduser()
        for candidate in (state_dir, state_dir / store_subdir(cfg)):
            store = cls(candidate, fingerprint)
            if store.saved():
                return store
        raise StateError(
            f"no {ARRAYS_FILE} in {state_dir} or {candidate}: is this the client's state directory?"
        )

    @property
    def arrays_path(self) -> Path:
        return self.state_dir / ARRAYS_FILE

    @property
    def meta_path(self) -> Path:
        return self.state_dir / META_FILE

    def saved(self) -> bool:
        """Whether private arrays were saved to this directory."""
        return self.arrays_path.is_file()

    def load(self, expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
        """The saved private arrays, or ``None`` when nothing was saved yet."""
        if not expected:
            return {}
        cached = self._from_context()
        if cached is not None and self._fits(cached, expected):
            return cached
        if not self.saved():
            return None
        self._check_fingerprint(self._read_meta().get("fingerprint"))
        arrays = self._read_arrays()
        if not self._fits(arrays, expected):
            raise StateError(f"{self.arrays_path} does not match this model's private parameters")
        return arrays

    def read(self) -> dict[str, np.ndarray]:
        """Every array saved on disk, whatever its shapes (the caller checks them: ``fedvit export``).

        A ``meta.json`` of another model or method raises :class:`StateError`; a missing one (a
        save interrupted between its two files) is accepted."""
        if not self.saved():
            raise StateError(f"no {ARRAYS_FILE} in {self.state_dir}")
        if self.meta_path.is_file():
            self._check_fingerprint(self._read_meta().get("fingerprint"))
        return self._read_arrays()

    def save(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Write ``arrays`` to disk (always) and to ``context.state`` (when small)."""
        if not arrays:
            return
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        for k, v in arrays.items():
            if v.dtype.kind not in "fiub":
                raise StateError(
                    f"private parameter '{k}' has dtype {v.dtype}; only numeric arrays are stored"
                )
        io.write_npz(self.arrays_path, arrays, mode=FILE_MODE, durable=False)  # every round: see fedvit.io
        meta = {"fingerprint": self.fingerprint, "shapes": {k: list(v.shape) for k, v in arrays.items()}}
        io.write_json(self.meta_path, meta, indent=1, mode=FILE_MODE, durable=False)
        if self.context_state is not None:
            size = sum(v.nbytes for v in arrays.values())
            if size <= self.context_max_bytes:
                self.context_state[CONTEXT_KEY] = to_record(arrays)
            elif CONTEXT_KEY in self.context_state:
                del self.context_state[CONTEXT_KEY]

    def _from_context(self) -> dict[str, np.ndarray] | None:
        if self.context_state is None or CONTEXT_KEY not in self.context_state:
            return None
        record = self.context_state[CONTEXT_KEY]
        if not isinstance(record, ArrayRecord):
            return None
        return to_numpy(record)

    def _check_fingerprint(self, found: str | None) -> None:
        if found != self.fingerprint:
            raise StateError(
                f"state directory {self.state_dir} holds private parameters of another model or method "
                f"(fingerprint {found} != {self.fingerprint}); choose another state-dir or delete it"
            )

    def _read_arrays(self) -> dict[str, np.ndarray]:
        try:
            with np.load(self.arrays_path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as err:
            raise StateError(f"cannot read {self.arrays_path}: {err}; delete it to start fresh") from err

    def _read_meta(self) -> dict:
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError) as err:
            raise StateError(
                f"cannot read {self.meta_path}: {err}; delete the state directory to start fresh"
            ) from err

    @staticmethod
    def _fits(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> bool:
        return set(arrays) == set(expected) and all(
            tuple(arrays[k].shape) == tuple(expected[k]) for k in expected
        )
