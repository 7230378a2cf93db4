"""A federation's partition as data: the per-client index arrays (:class:`Partition`), the
fingerprint of everything they depend on, and their on-disk cache (index arrays packed into one
``.npz``, checked against the data before use). How a partition is computed:
:mod:`fedvit.data.partition`."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedvit.config import FedvitConfig, fingerprint
from fedvit.data.sources import source_identity
from fedvit.data.store import DataError
from fedvit.io import write_npz

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass(frozen=True)
class ClientIndices:
    """One client's examples: ``train`` / ``val`` index the train split, ``test`` the test split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    natural_id: str | None = None


@dataclass
class Partition:
    """Per-client index arrays for a whole federation."""

    fingerprint: str
    train: list[np.ndarray]
    val: list[np.ndarray]
    test: list[np.ndarray]
    natural_ids: list[str] | None = None

    @property
    def num_clients(self) -> int:
        return len(self.train)

    def client(self, client_id: int) -> ClientIndices:
        """The indices of one client; an unknown id raises a :class:`DataError`."""
        if not 0 <= client_id < self.num_clients:
            raise DataError(
                f"client id {client_id} is out of range: the partition has clients.num_clients="
                f"{self.num_clients} clients (ids 0..{self.num_clients - 1})"
            )
        nid = self.natural_ids[client_id] if self.natural_ids else None
        return ClientIndices(self.train[client_id], self.val[client_id], self.test[client_id], nid)


def partition_fingerprint(cfg: FedvitConfig, path_override: str | None = None) -> str:
    """Hash of everything a partition depends on (dataset, files, partition config, clients, seed)."""
    d = cfg.data
    partition = dataclasses.asdict(d.partition)
    # Options at their defaults leave the hash (and so the caches made before them) as it was.
    if not partition["pool"]:
        del partition["pool"], partition["test_fraction"]
    if not partition["self_balancing"]:
        del partition["self_balancing"]
    return fingerprint(
        {
            "version": CACHE_VERSION,
            "name": d.name,
            "source": source_identity(d, path_override),
            "partition": partition,
            "num_classes": d.num_classes,
            "val_fraction": d.val_fraction,
            "test_fraction": d.test_fraction,
            "max_train_per_client": d.max_train_per_client,
            "num_clients": cfg.clients.num_clients,
            "seed": cfg.seed,
        }
    )


def cache_path(cfg: FedvitConfig, fp: str) -> Path:
    root = (
        Path(cfg.data.cache_dir).expanduser()
        if cfg.data.cache_dir
        else Path.home() / ".cache/fedvit/partitions"
    )
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cfg.data.name)
    kind = cfg.data.partition.kind + ("-pooled" if cfg.data.partition.pool else "")
    return root / f"{safe}-{kind}-{cfg.clients.num_clients}c-{fp}.npz"


def _pack(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    ptr = np.cumsum([0, *(len(a) for a in arrays)]).astype(np.int64)
    flat = np.concatenate(arrays).astype(np.int64) if arrays else np.empty(0, np.int64)
    return flat, ptr


def _unpack(flat: np.ndarray, ptr: np.ndarray) -> list[np.ndarray]:
    return [flat[ptr[i] : ptr[i + 1]] for i in range(len(ptr) - 1)]


def write_cache(path: Path, part: Partition, n_train: int, n_test: int, pooled: bool = False) -> None:
    """Atomically write ``part`` as index arrays (:func:`fedvit.io.write_npz`; owner-only, no ``fsync``)."""
    meta = {
        "version": CACHE_VERSION,
        "fingerprint": part.fingerprint,
        "num_clients": part.num_clients,
        "n_train": n_train,
        "n_test": n_test,
        "natural_ids": part.natural_ids,
        "pooled": pooled,
    }
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
    for name in ("train", "val", "test"):
        arrays[f"{name}_idx"], arrays[f"{name}_ptr"] = _pack(getattr(part, name))
    write_npz(path, arrays, mode=0o600, durable=False)


def read_cache(path: Path, fp: str, n_train: int, n_test: int) -> Partition | None:
    """The cached partition, or ``None`` if missing, unreadable or inconsistent (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            if meta["version"] != CACHE_VERSION or meta["fingerprint"] != fp:
                raise ValueError("fingerprint mismatch")
            split = {
                name: _unpack(npz[f"{name}_idx"], npz[f"{name}_ptr"]) for name in ("train", "val", "test")
            }
        k = meta["num_clients"]
        if meta["n_train"] != n_train or meta["n_test"] != n_test or any(len(v) != k for v in split.values()):
            raise ValueError("sizes do not match the data")
        _check_indices(split["train"] + split["val"], n_train, "train/val")
        _check_indices(split["test"], n_test, "test")
        if meta.get("pooled"):  # train, val and test index one split: disjoint all together
            _check_indices(split["train"] + split["val"] + split["test"], n_train, "pooled")
        return Partition(fp, split["train"], split["val"], split["test"], meta["natural_ids"])
    except Exception as err:  # a corrupted or foreign file: never trust it
        log.warning("partition cache %s is invalid (%s); rebuilding it", path, err)
        return None


def _check_indices(arrays: list[np.ndarray], n: int, what: str) -> None:
    flat = np.concatenate(arrays) if arrays else np.empty(0, np.int64)
    if flat.dtype.kind not in "iu" or (len(flat) and (flat.min() < 0 or flat.max() >= n)):
        raise ValueError(f"{what} indices out of range")
    if len(np.unique(flat)) != len(flat):
        raise ValueError(f"{what} indices overlap")
