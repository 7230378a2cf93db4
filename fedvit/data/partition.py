"""Federated partitions: which training and test examples each client owns.

The training split is divided over ``clients.num_clients`` clients with flwr-datasets partitioners
run on a labels-only ``datasets.Dataset`` (no images are touched):

``iid``           ``IidPartitioner`` on a seeded permutation
``dirichlet``     ``DirichletPartitioner`` with ``alpha=data.partition.alpha`` and
                  ``min_partition_size=data.partition.min_size``
``pathological``  ``PathologicalPartitioner(num_classes_per_partition=data.partition.classes_per_client)``
                  in ``first-deterministic`` mode (every class is used once there are enough clients)
``natural``       ``NaturalIdPartitioner`` on ``data.partition.id_key``; with fewer clients than ids,
                  ``num_clients`` ids are drawn with the seed

Each client's partition is optionally capped (``data.max_train_per_client``, stratified), then split
into train and val (``data.val_fraction``, stratified, at least one val example when the fraction is
positive, at least one train example always).

Test sets follow each client's own label distribution (the FedTP / FedPerfix protocol): for every
class c, client k receives ``round(T_c * n_kc / N_c)`` of the T_c test examples of class c, where
n_kc counts class c in the client's partition (train + val) and N_c in the whole training split
(largest-remainder rounding, so every client is within one example of its quota, and test sets are
disjoint). Clients that together hold the whole training split share the whole test split; capped or
sub-sampled federations get a proportionally smaller test set. ``natural`` partitions whose test
split carries the same ids (LEAF FEMNIST) give each client its own writer's test examples instead.

The pooled protocol (``data.partition.pool: true``; FedPerfix / PFLlib, FL-bench alike) instead
pools the dataset's official splits (train, then val where the source has one, then test) into one
split, partitions that with the partitioner above (so ``data.partition.min_size`` counts a client's
pooled examples, and a Dirichlet draw that leaves a client below it is re-drawn), and splits each
client's share into its own test set (``data.partition.test_fraction``, default 0.25, stratified
by label, seeded, at least one example of each side when the client has two) and the rest, from
which the cap and ``data.val_fraction`` are taken exactly as above. All indices then index the
pooled split; no example is in two clients or in two of a client's splits.

Partitions are cached on disk as index arrays (npz) under ``data.cache_dir`` (default
``~/.cache/fedvit/partitions``), keyed by a fingerprint of everything that decides them, and in memory
per process. Writes are atomic; an unreadable or inconsistent cache file is rebuilt.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any

import numpy as np

from fedvit.config import DataConfig, FedvitConfig
from fedvit.data.partcache import (  # noqa: F401 - re-exported: fedvit.data names them here
    CACHE_VERSION,
    ClientIndices,
    Partition,
    cache_path,
    partition_fingerprint,
    read_cache,
    write_cache,
)
from fedvit.data.sources import load_source
from fedvit.data.store import ConcatStore, DataError, SourceData, Split

log = logging.getLogger(__name__)

# Independent random streams, all derived from cfg.seed.
_HOLDOUT, _IID, _NATURAL, _CLIENT, _TEST, _POOLED_TEST = range(1, 7)

_MEMORY: dict[str, Partition] = {}
# Pooled splits per loaded source (keyed by the ids of its splits, which it keeps alive).
_POOLED: dict[tuple[int, ...], tuple[tuple[Split, ...], Split]] = {}


# --------------------------------------------------------------------------- sampling helpers


def _rng(seed: int, stream: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *more])


def largest_remainder(quota: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to ``total``, each ``floor(q)`` or ``floor(q) + 1`` (for ``sum(quota) ~ total``)."""
    base = np.floor(quota).astype(np.int64)
    short = int(total - base.sum())
    if short > 0:
        order = np.argsort(-(quota - base), kind="stable")
        base[order[:short]] += 1
    return base


def stratified_sample(labels: np.ndarray, n_take: int, rng: np.random.Generator) -> np.ndarray:
    """``n_take`` sorted positions into ``labels``, drawn per class in proportion to its count."""
    n = len(labels)
    n_take = min(max(int(n_take), 0), n)
    if n_take in (0, n):
        return np.arange(n_take, dtype=np.int64)
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    alloc = np.minimum(largest_remainder(n_take * counts / n, n_take), counts)
    picked = [rng.permutation(np.flatnonzero(inverse == j))[:a] for j, a in enumerate(alloc) if a > 0]
    chosen = np.concatenate(picked) if picked else np.empty(0, np.int64)
    if len(chosen) < n_take:  # rounding left a gap: fill at random
        rest = np.setdiff1d(np.arange(n), chosen)
        chosen = np.concatenate([chosen, rng.choice(rest, n_take - len(chosen), replace=False)])
    return np.sort(chosen).astype(np.int64)


def with_test_split(source: SourceData, test_fraction: float, seed: int) -> SourceData:
    """``source`` itself if it has a test split, else a stratified, seeded hold-out of its train split."""
    if source.test is not None:
        return source
    labels = source.train.labels
    test_pos = stratified_sample(labels, round(test_fraction * len(labels)), _rng(seed, _HOLDOUT))
    if len(test_pos) in (0, len(labels)):
        raise DataError(
            f"key 'data.test_fraction': holding out {test_fraction} of {len(labels)} examples of "
            f"'{source.name}' leaves no test or no train example"
        )
    train_pos = np.setdiff1d(np.arange(len(labels)), test_pos)
    return SourceData(
        source.name,
        source.train.subset(train_pos),
        source.train.subset(test_pos),
        source.class_names,
        dict(source.info),
        test_held_out=True,
    )


def prepared_source(cfg: FedvitConfig, path_override: str | None = None) -> SourceData:
    """The source with a test split (held out with the seed if needed) and checked labels."""
    source = with_test_split(load_source(cfg.data, path_override), cfg.data.test_fraction, cfg.seed)
    for name, split in (("train", source.train), ("test", source.test)):
        if (
            split is not None
            and len(split)
            and (split.labels.min() < 0 or split.labels.max() >= cfg.data.num_classes)
        ):
            raise DataError(
                f"key 'data.num_classes': the {name} split of '{cfg.data.name}' has labels "
                f"{split.labels.min()}..{split.labels.max()}, but data.num_classes is {cfg.data.num_classes}"
            )
    return source


def pool_splits(source: SourceData) -> Split:
    """The source's official splits end to end: train, then val (if any), then test (if any)."""
    parts = tuple(s for s in (source.train, source.val, source.test) if s is not None and len(s))
    if len(parts) == 1:
        return parts[0]
    key = tuple(id(s) for s in parts)
    if key not in _POOLED:
        ids = None if any(s.ids is None for s in parts) else np.concatenate([s.ids for s in parts])  # type: ignore[misc]
        pooled = Split(ConcatStore([s.images for s in parts]), np.concatenate([s.labels for s in parts]), ids)
        if len(_POOLED) >= 4:
            _POOLED.pop(next(iter(_POOLED)))
        _POOLED[key] = (parts, pooled)
    return _POOLED[key][1]


def client_source(cfg: FedvitConfig, path_override: str | None = None) -> SourceData:
    """The splits that clients' indices point into.

    By default :func:`prepared_source`. With ``data.partition.pool`` the pooled split
    (:func:`pool_splits`) serves as both ``train`` and ``test`` (``info["pooled"]`` gives the sizes of
    the official splits in it).
    """
    if not cfg.data.partition.pool:
        return prepared_source(cfg, path_override)
    source = load_source(cfg.data, path_override)
    pooled = pool_splits(source)
    if len(pooled) and (pooled.labels.min() < 0 or pooled.labels.max() >= cfg.data.num_classes):
        raise DataError(
            f"key 'data.num_classes': the pooled splits of '{cfg.data.name}' have labels "
            f"{pooled.labels.min()}..{pooled.labels.max()}, but data.num_classes is {cfg.data.num_classes}"
        )
    official = (("train", source.train), ("val", source.val), ("test", source.test))
    sizes = {name: len(split) for name, split in official if split is not None}
    info = {**source.info, "pooled": sizes}
    return SourceData(source.name, pooled, pooled, source.class_names, info)


def describe_protocol(cfg: FedvitConfig) -> str:
    """One line on how ``cfg`` splits the data, e.g. for ``fedvit partition``'s title."""
    p, k = cfg.data.partition, cfg.clients.num_clients
    what = {
        "iid": "iid",
        "dirichlet": f"dirichlet(alpha={p.alpha}, min_size={p.min_size})",
        "pathological": f"pathological({p.classes_per_client} classes per client)",
        "natural": f"natural ids '{p.id_key}'",
    }.get(p.kind, p.kind)
    if p.pool:
        train = round(100 * (1 - p.test_fraction))
        return f"{what} over {k} clients, pooled splits, {train}/{100 - train} train/test per client"
    return f"{what} over {k} clients, official test split shared out by label"


# --------------------------------------------------------------------------- partitioners


def _labels_dataset(train: Split, id_key: str | None, order: np.ndarray) -> Any:
    import datasets

    columns: dict[str, Any] = {"label": train.labels[order], "_idx": order}
    if id_key is not None:
        columns[id_key] = train.ids[order].astype(str)  # type: ignore[index]
    return datasets.Dataset.from_dict(columns)


def _indices_of(partition: Any) -> np.ndarray:
    """The source row numbers of a partition (read as one Arrow column, not row by row)."""
    return partition.with_format("arrow")[:]["_idx"].to_numpy().astype(np.int64)


def _make_partitioner(cfg: FedvitConfig, train: Split) -> tuple[Any, np.ndarray]:
    """The flwr-datasets partitioner for ``data.partition.kind`` and the row order it sees."""
    from flwr_datasets import partitioner as fp

    p, k = cfg.data.partition, cfg.clients.num_clients
    order = np.arange(len(train), dtype=np.int64)
    if p.kind == "iid":
        return fp.IidPartitioner(num_partitions=k), _rng(cfg.seed, _IID).permutation(order)
    if p.kind == "dirichlet":
        if p.min_size * k > len(train):
            raise DataError(
                f"key 'data.partition.min_size': {k} clients x min_size {p.min_size} > {len(train)} "
                f"{_examples(cfg)} examples; lower data.partition.min_size or clients.num_clients"
            )
        return (
            fp.DirichletPartitioner(
                num_partitions=k,
                partition_by="label",
                alpha=float(p.alpha),
                min_partition_size=p.min_size,
                self_balancing=p.self_balancing,
                seed=cfg.seed,
            ),
            order,
        )
    if p.kind == "pathological":
        present = len(np.unique(train.labels))
        if p.classes_per_client > present:
            raise DataError(
                f"key 'data.partition.classes_per_client': {p.classes_per_client} classes per client, "
                f"but the training split has only {present} classes"
            )
        return (
            fp.PathologicalPartitioner(
                num_partitions=k,
                partition_by="label",
                num_classes_per_partition=p.classes_per_client,
                class_assignment_mode="first-deterministic",
                seed=cfg.seed,
            ),
            order,
        )
    if p.kind == "natural":
        if train.ids is None:
            raise DataError(
                f"key 'data.partition.id_key': dataset '{cfg.data.name}' has no natural client id "
                f"column '{p.id_key}'; use another data.partition.kind"
            )
        return fp.NaturalIdPartitioner(partition_by=p.id_key), order
    raise DataError(f"key 'data.partition.kind': unknown partition kind '{p.kind}'")


def _examples(cfg: FedvitConfig) -> str:
    """What the partitioner splits: the training split, or the pooled splits (pooled protocol)."""
    return "pooled" if cfg.data.partition.pool else "training"


def _partition_error(cfg: FedvitConfig, n: int, err: Exception) -> DataError:
    p, k = cfg.data.partition, cfg.clients.num_clients
    keys, params = {
        "iid": ("'clients.num_clients'", ""),
        "dirichlet": (
            "'data.partition.alpha' / 'data.partition.min_size' / 'clients.num_clients'",
            f" (alpha={p.alpha}, min_size={p.min_size})",
        ),
        "pathological": (
            "'data.partition.classes_per_client' / 'clients.num_clients'",
            f" (classes_per_client={p.classes_per_client})",
        ),
        "natural": ("'clients.num_clients'", f" (id_key={p.id_key})"),
    }[p.kind]
    return DataError(
        f"key {keys}: cannot make a {p.kind} partition of {n} {_examples(cfg)} examples over {k} clients"
        f"{params}: {err}"
    )


def split_train(cfg: FedvitConfig, train: Split) -> tuple[list[np.ndarray], list[str] | None]:
    """Each client's partition of the train split (indices), and its natural id for ``natural``."""
    k, kind = cfg.clients.num_clients, cfg.data.partition.kind
    if k > len(train):
        raise DataError(
            f"key 'clients.num_clients': {k} clients but only {len(train)} {_examples(cfg)} examples"
        )
    partitioner, order = _make_partitioner(cfg, train)
    partitioner.dataset = _labels_dataset(
        train, cfg.data.partition.id_key if kind == "natural" else None, order
    )
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):  # retries warn, tqdm prints
        warnings.simplefilter("ignore")
        try:
            available = partitioner.num_partitions
            if k > available:
                raise DataError(
                    f"key 'clients.num_clients': {k} clients, but '{cfg.data.name}' has only {available} "
                    f"distinct '{cfg.data.partition.id_key}' ids (data.partition.id_key) for a natural "
                    "partition"
                )
            pids = (
                range(k)
                if k == available
                else np.sort(_rng(cfg.seed, _NATURAL).choice(available, k, replace=False))
            )
            parts = [_indices_of(partitioner.load_partition(int(i))) for i in pids]
        except DataError:
            raise
        except (ValueError, AssertionError) as err:
            raise _partition_error(cfg, len(train), err) from err
    empty = [i for i, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise _partition_error(cfg, len(train), ValueError(f"clients {empty} get no example"))
    natural = (
        [str(partitioner.partition_id_to_natural_id[int(i)]) for i in pids] if kind == "natural" else None
    )
    return parts, natural


def train_val_split(
    labels: np.ndarray, part: np.ndarray, data: DataConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Cap a client's partition (``data.max_train_per_client``) and hold out ``data.val_fraction`` as val."""
    if data.max_train_per_client is not None and len(part) > data.max_train_per_client:
        part = part[stratified_sample(labels[part], data.max_train_per_client, rng)]
    n = len(part)
    n_val = 0 if data.val_fraction == 0 or n < 2 else min(max(round(data.val_fraction * n), 1), n - 1)
    val_pos = stratified_sample(labels[part], n_val, rng)
    keep = np.ones(n, dtype=bool)
    keep[val_pos] = False
    return np.sort(part[keep]), np.sort(part[val_pos])


def allocate_test(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    parts: list[np.ndarray],
    num_classes: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Disjoint test sets with each client's label distribution (see the module docstring)."""
    totals = np.bincount(train_labels, minlength=num_classes)
    counts = np.stack([np.bincount(train_labels[p], minlength=num_classes) for p in parts])
    out: list[list[np.ndarray]] = [[] for _ in parts]
    for c in range(num_classes):
        pool = rng.permutation(np.flatnonzero(test_labels == c))
        if len(pool) == 0 or totals[c] == 0:
            continue
        quota = len(pool) * counts[:, c] / totals[c]
        alloc = largest_remainder(quota, min(round(quota.sum()), len(pool)))
        for k, chunk in enumerate(np.split(pool, np.cumsum(alloc)[:-1])):
            out[k].append(chunk[: alloc[k]])
    return [
        np.sort(np.concatenate(chunks)).astype(np.int64) if chunks else np.empty(0, np.int64)
        for chunks in out
    ]


def pooled_client_split(
    labels: np.ndarray, part: np.ndarray, cfg: FedvitConfig, client_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One client's share of the pooled split -> sorted (train, val, test) indices.

    ``data.partition.test_fraction`` of it (stratified, seeded per client; at least one example on
    each side when it has two) is its test set; the cap and val are taken from the rest as
    :func:`train_val_split` does in the default protocol.
    """
    n, frac = len(part), cfg.data.partition.test_fraction
    n_test = 0 if n < 2 else min(max(round(frac * n), 1), n - 1)
    test_pos = stratified_sample(labels[part], n_test, _rng(cfg.seed, _POOLED_TEST, client_id))
    rest = np.ones(n, dtype=bool)
    rest[test_pos] = False
    train, val = train_val_split(labels, np.sort(part[rest]), cfg.data, _rng(cfg.seed, _CLIENT, client_id))
    return train, val, np.sort(part[test_pos]).astype(np.int64)


def compute_partition(cfg: FedvitConfig, source: SourceData, fp: str = "") -> Partition:
    """Build a partition from scratch (no cache); ``source`` as :func:`client_source` gives it."""
    assert source.test is not None
    labels = source.train.labels
    if cfg.data.partition.pool:
        parts, natural = split_train(cfg, source.train)
        split3 = [pooled_client_split(labels, part, cfg, k) for k, part in enumerate(parts)]
        return Partition(fp, *([s[i] for s in split3] for i in range(3)), natural)
    parts, natural = split_train(cfg, source.train)
    splits = [
        train_val_split(labels, part, cfg.data, _rng(cfg.seed, _CLIENT, k)) for k, part in enumerate(parts)
    ]
    kept = [np.sort(np.concatenate(s)) for s in splits]
    if natural is not None and source.test.ids is not None:
        test_ids = source.test.ids.astype(str)
        tests = [np.flatnonzero(test_ids == nid).astype(np.int64) for nid in natural]
    else:
        tests = allocate_test(labels, source.test.labels, kept, cfg.data.num_classes, _rng(cfg.seed, _TEST))
    return Partition(fp, [s[0] for s in splits], [s[1] for s in splits], tests, natural)


def local_client_indices(cfg: FedvitConfig, source: SourceData, client_id: int) -> ClientIndices:
    """A device that owns a whole source: all its train split (minus val) and all its test split; by
    the pooled protocol (``source`` from :func:`client_source`), its pooled splits cut as one client's."""
    assert source.test is not None
    n = len(source.train)
    if cfg.data.partition.pool:
        train, val, test = pooled_client_split(source.train.labels, np.arange(n), cfg, client_id)
        return ClientIndices(train, val, test)
    train, val = train_val_split(
        source.train.labels, np.arange(n), cfg.data, _rng(cfg.seed, _CLIENT, client_id)
    )
    return ClientIndices(train, val, np.arange(len(source.test), dtype=np.int64))


def build_partition(cfg: FedvitConfig) -> Partition:
    """The seeded partition of ``cfg`` (memory cache, then disk cache, then built and cached)."""
    fp = partition_fingerprint(cfg)
    if fp in _MEMORY:
        return _MEMORY[fp]
    source = client_source(cfg)
    assert source.test is not None
    path = cache_path(cfg, fp)
    part = read_cache(path, fp, len(source.train), len(source.test))
    if part is None:
        part = compute_partition(cfg, source, fp)
        try:
            write_cache(path, part, len(source.train), len(source.test), cfg.data.partition.pool)
        except OSError as err:  # a read-only cache dir must not stop a run
            log.warning("cannot write partition cache %s: %s", path, err)
    _MEMORY[fp] = part
    return part


def clear_memory_cache() -> None:
    """Forget partitions and pooled splits built in this process (the disk cache stays)."""
    _MEMORY.clear()
    _POOLED.clear()
