"""pFedLA's on-disk model store (fedvit.modelstore): every version is a new file, written atomically
and durably, readable by its owner alone; the previous version's file is untouched until commit."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fedvit.modelstore import ModelStore

SHAPES = {"a": (2, 3), "b": (4,)}


def arrays(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) for k, s in SHAPES.items()}


def test_a_version_is_a_new_owner_only_file_and_the_old_one_stays_until_commit(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", SHAPES, num_clients=2, initial=arrays(0.0))
    store.write(0, arrays(1.0), version=1)
    v1 = store.path(0, 1)
    inode = v1.stat().st_ino
    store.write(0, arrays(2.0), version=2)
    assert v1.stat().st_ino == inode and np.all(store.read(0, versions=[1, 0]) == 1.0)
    assert np.all(store.read(0) == 2.0) and np.all(store.read(1) == 0.0)
    for name in ("initial.npy", "client-0.v1.npy", "client-0.v2.npy"):
        assert (store.root / name).stat().st_mode & 0o777 == 0o600, name
    (store.root / ".client-1.v3.npy.dead.tmp").write_bytes(b"half")  # a crashed write
    store.commit()
    assert sorted(p.name for p in store.root.iterdir()) == ["client-0.v2.npy", "initial.npy"]


def test_every_write_is_fsynced_before_it_replaces_anything(tmp_path: Path, monkeypatch) -> None:
    store = ModelStore(tmp_path / "store", SHAPES, num_clients=1, initial=arrays(0.0))
    target = store.path(0, 1)
    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(target.exists())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store.write(0, arrays(1.0), version=1)
    assert synced == [False] and np.all(store.read(0) == 1.0)
