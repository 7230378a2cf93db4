"""A server-side store of one model per client, on disk, so server memory does not grow with N.

Layout (``root/``):

* ``initial.npy``: the seeded initial model as one flat float32 vector (every client's model
  until it first trains; version 0 of every client refers to it, stored once);
* ``client-<j>.v<r>.npy``: client j's model as stored after round r (flat float32 vector).

The flat vector concatenates the store's keys in :attr:`ModelStore.keys` order (the caller
chooses it, e.g. grouped by aggregation layer, so that a layer is one contiguous slice).

**Versions and crash consistency.** :attr:`ModelStore.versions` says which file holds each
client's model now. :meth:`ModelStore.write` writes a *new* file atomically (:func:`fedvit.io.atomic_write`:
temporary file, ``fsync``, ``os.replace``) and never touches the file the previous version lives in, so the
store as of the last checkpoint stays intact on disk until :meth:`ModelStore.commit` (called
after the checkpoint that records the new versions) deletes unreferenced files.
:meth:`ModelStore.restore` (on resume) re-adopts the checkpoint's versions, checks that their
files exist with the right size and removes anything newer (a round that crashed midway).

Reads go through :meth:`ModelStore.read` (positioned file reads; the page cache holds the data,
not the process) or :meth:`ModelStore.open` (a read-only ``np.memmap``, for random access).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedvit.io import atomic_write

DTYPE = np.dtype(np.float32)
_CLIENT_FILE = re.compile(r"^client-(\d+)\.v(\d+)\.npy$")


class ModelStore:
    """``num_clients`` float32 models of fixed layout (``shapes``, in key order) under ``root``."""

    def __init__(
        self,
        root: Path,
        shapes: Mapping[str, tuple[int, ...]],
        num_clients: int,
        initial: Mapping[str, np.ndarray],
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keys = list(shapes)
        self.shapes = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
        sizes = [int(np.prod(self.shapes[k])) for k in self.keys]
        bounds = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.offsets = {k: (int(bounds[n]), int(bounds[n + 1])) for n, k in enumerate(self.keys)}
        self.size = int(bounds[-1])
        self.num_clients = num_clients
        self.versions = [0] * num_clients
        init = self.flatten(initial)
        path = self.path(0, 0)
        if not path.is_file() or not np.array_equal(np.load(path, mmap_mode="r"), init):
            self._write_file(path, init)
        self._data_offset = int(np.load(path, mmap_mode="r").offset)

    # ------------------------------------------------------------------ layout

    def flatten(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """``arrays`` (exactly the store's keys and shapes) as one flat float32 vector."""
        if set(arrays) != set(self.keys):
            raise ValueError(f"model store: expected keys {self.keys[:3]}..., got {sorted(arrays)[:3]}...")
        out = np.empty(self.size, dtype=DTYPE)
        for k in self.keys:
            a, b = self.offsets[k]
            v = np.asarray(arrays[k])
            if tuple(v.shape) != self.shapes[k]:
                raise ValueError(f"model store: '{k}' has shape {v.shape}, expected {self.shapes[k]}")
            out[a:b] = v.reshape(-1)
        return out

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The inverse of :meth:`flatten` (views into ``flat``)."""
        return {k: flat[a:b].reshape(self.shapes[k]) for k, (a, b) in self.offsets.items()}

    # ------------------------------------------------------------------ files

    def path(self, client: int, version: int | None = None) -> Path:
        """The file of ``client``'s model at ``version`` (default: its current one)."""
        version = self.versions[client] if version is None else version
        return self.root / ("initial.npy" if version == 0 else f"client-{client}.v{version}.npy")

    def _write_file(self, path: Path, flat: np.ndarray) -> None:
        """``flat`` as a ``.npy`` file, atomically and durably, readable by its owner alone."""
        atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(flat, dtype=DTYPE)), mode=0o600)

    def read(self, client: int, versions: Sequence[int] | None = None) -> np.ndarray:
        """``client``'s model as a flat float32 vector (a fresh array), at ``versions[client]``
        (default: the current versions)."""
        version = (self.versions if versions is None else versions)[client]
        with open(self.path(client, version), "rb") as f:
            f.seek(self._data_offset)
            out = np.fromfile(f, dtype=DTYPE, count=self.size)
        if out.size != self.size:
            raise OSError(f"model store: {self.path(client, version)} is truncated")
        return out

    def open(self, client: int) -> np.memmap:
        """A read-only memory map of ``client``'s current model (flat)."""
        return np.load(self.path(client), mmap_mode="r")

    def get(self, client: int) -> dict[str, np.ndarray]:
        """``client``'s current model by key (copies)."""
        return self.unflatten(self.read(client))

    def write(self, client: int, arrays: Mapping[str, np.ndarray] | np.ndarray, version: int) -> None:
        """Store ``client``'s new model as ``version`` (> its current one) atomically."""
        if version <= self.versions[client]:
            raise ValueError(
                f"model store: client {client} is at version {self.versions[client]}, cannot write {version}"
            )
        flat = arrays if isinstance(arrays, np.ndarray) else self.flatten(arrays)
        if flat.shape != (self.size,):
            raise ValueError(f"model store: flat model of shape {flat.shape}, expected ({self.size},)")
        self._write_file(self.path(client, version), flat)
        self.versions[client] = version

    # ------------------------------------------------------------------ consistency

    def commit(self) -> None:
        """Delete every client file (and stray temporary file) the current versions do not use."""
        keep = {self.path(c).name for c in range(self.num_clients)} | {"initial.npy"}
        for p in self.root.iterdir():
            if p.name not in keep and (_CLIENT_FILE.match(p.name) or p.name.endswith(".tmp")):
                p.unlink(missing_ok=True)

    def restore(self, versions: Sequence[int]) -> None:
        """Adopt checkpointed ``versions``: their files must exist whole; newer files are removed."""
        versions = [int(v) for v in versions]
        if len(versions) != self.num_clients:
            raise ValueError(
                f"model store: checkpoint has {len(versions)} clients, this run {self.num_clients}"
            )
        expected = self._data_offset + self.size * DTYPE.itemsize
        for c, v in enumerate(versions):
            p = self.path(c, v)
            if not p.is_file() or p.stat().st_size != expected:
                raise FileNotFoundError(f"model store: {p} (client {c}, version {v}) is missing or damaged")
        self.versions = versions
        self.commit()

    def nbytes_on_disk(self) -> int:
        """Bytes of the files the current versions use (``initial.npy`` once)."""
        return sum(p.stat().st_size for p in {self.path(c) for c in range(self.num_clients)})
