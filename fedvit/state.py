"""Persistent private state of a client.

Private parameters never leave the client. They are always written to the client's state
directory (atomically: a temporary file, then ``os.replace``), so a real device keeps its
personal model across rounds, SuperNode restarts and runs. When they are small
(``clients.context_state_max_mb``) they are also cached in Flower's ``context.state``,
which Flower drops silently above ~100 MB and on SuperNode restarts.

The directory holds ``private.npz`` (the arrays) and ``meta.json`` (their names and shapes,
and the model/method fingerprint), so a state directory written by a different model or
method is refused with a clear message instead of being half-loaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

CONTEXT_KEY = "fedvit.private"


class StateError(ValueError):
    """A state directory that cannot be used for this client."""


def default_state_dir(run_key: str, client_id: int) -> Path:
    """``$FEDVIT_STATE_DIR`` or ``~/.cache/fedvit/state``, then ``<run-key>/client-<id>``
    (``run-key`` = the run name plus a per-run suffix, kept when a run resumes)."""
    root = Path(os.environ.get("FEDVIT_STATE_DIR", Path.home() / ".cache" / "fedvit" / "state"))
    return root / run_key / f"client-{client_id}"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

    @property
    def arrays_path(self) -> Path:
        return self.state_dir / "private.npz"

    @property
    def meta_path(self) -> Path:
        return self.state_dir / "meta.json"

    def load(self, expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
        """The saved private arrays, or ``None`` when nothing was saved yet."""
        if not expected:
            return {}
        cached = self._from_context()
        if cached is not None and self._fits(cached, expected):
            return cached
        if not self.arrays_path.is_file():
            return None
        meta = self._read_meta()
        if meta.get("fingerprint") != self.fingerprint:
            raise StateError(
                f"state directory {self.state_dir} holds private parameters of another model or method "
                f"(fingerprint {meta.get('fingerprint')} != {self.fingerprint}); "
                "choose another state-dir or delete it"
            )
        try:
            with np.load(self.arrays_path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as err:
            raise StateError(f"cannot read {self.arrays_path}: {err}; delete it to start fresh") from err
        if not self._fits(arrays, expected):
            raise StateError(f"{self.arrays_path} does not match this model's private parameters")
        return arrays

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
        _atomic_write(self.arrays_path, lambda f: np.savez(f, **arrays))
        meta = {"fingerprint": self.fingerprint, "shapes": {k: list(v.shape) for k, v in arrays.items()}}
        _atomic_write(self.meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        if self.context_state is not None:
            size = sum(v.nbytes for v in arrays.values())
            if size <= self.context_max_bytes:
                self.context_state[CONTEXT_KEY] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
            elif CONTEXT_KEY in self.context_state:
                del self.context_state[CONTEXT_KEY]

    def _from_context(self) -> dict[str, np.ndarray] | None:
        if self.context_state is None or CONTEXT_KEY not in self.context_state:
            return None
        record = self.context_state[CONTEXT_KEY]
        if not isinstance(record, ArrayRecord):
            return None
        return {k: v.numpy() for k, v in record.items()}

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
