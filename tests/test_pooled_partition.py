"""The pooled partition protocol (``data.partition.pool``; FedPerfix / PFLlib).

The official splits (train, val, test) are pooled, partitioned over the clients (Dirichlet with the
minimum-size re-draw), and each client's share is split into its own train / test (75/25 by default,
seeded), with its val carved from the train side. Fast tests use scikit-learn's digits and small
MedMNIST-layout npz files made here; one test uses the staged OrganAMNIST (skipped when absent).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
from flwr_datasets.partitioner import DirichletPartitioner

from fedvit.cli import main
from fedvit.config import ClientsConfig, ConfigError, DataConfig, FedvitConfig, PartitionConfig, load_config
from fedvit.data import (
    DataError,
    build_partition,
    cache_path,
    clear_all_caches,
    client_source,
    load_client_datasets,
    partition_fingerprint,
    summarize_partition,
)
from fedvit.data.partition import local_client_indices, pooled_client_split

SPLITS = {"train": 300, "val": 60, "test": 140}  # the synthetic npz: 500 examples pooled
POOLED = sum(SPLITS.values())


@pytest.fixture(autouse=True)
def _fresh_process_caches():
    clear_all_caches()
    yield
    clear_all_caches()


def write_medmnist_npz(path: Path, classes: int = 5, seed: int = 0) -> Path:
    """A MedMNIST-layout npz (``<split>_images`` (N, 6, 6) uint8, ``<split>_labels`` (N, 1))."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in SPLITS.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 6, 6), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, classes, (n, 1)).astype(np.int64)
    np.savez(path, **arrays)
    return path


def make_cfg(
    tmp_path: Path, *, num_clients: int = 6, seed: int = 0, npz: Path | None = None, **partition
) -> FedvitConfig:
    """Pooled protocol on digits, or on ``npz`` (a MedMNIST-layout file); cache under tmp_path."""
    partition = {"pool": True, **partition}
    data: dict = {"cache_dir": str(tmp_path / "cache"), "partition": PartitionConfig(**partition)}
    if npz is not None:
        data |= {
            "name": "synth",
            "source": "medmnist-npz",
            "path": npz.name,
            "data_dir": str(npz.parent),
            "num_classes": 5,
            "image_size": 6,
        }
    return FedvitConfig(seed=seed, data=DataConfig(**data), clients=ClientsConfig(num_clients=num_clients))


def splits_of(part) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [(c.train, c.val, c.test) for c in (part.client(k) for k in range(part.num_clients))]


def assert_75_25(part, fraction: float = 0.25) -> None:
    """Every client's test set is ``fraction`` of its examples, to the nearest example."""
    for k, (train, val, test) in enumerate(splits_of(part)):
        n = len(train) + len(val) + len(test)
        assert abs(len(test) - fraction * n) <= 0.5, (k, n, len(test))


# --------------------------------------------------------------------------- sizes and disjointness


def test_client_shares_sum_to_the_pooled_train_val_and_test(tmp_path):
    npz = write_medmnist_npz(tmp_path / "synth.npz")
    cfg = make_cfg(tmp_path, npz=npz, num_clients=4, min_size=20)
    part = build_partition(cfg)
    source = client_source(cfg)
    assert source.info["pooled"] == SPLITS
    assert len(source.train) == POOLED and source.test is source.train
    everything = np.concatenate([np.concatenate(s) for s in splits_of(part)])
    assert len(everything) == POOLED  # the client sizes sum to the pooled total
    np.testing.assert_array_equal(np.sort(everything), np.arange(POOLED))  # each example once


def test_pooled_split_is_train_then_val_then_test(tmp_path):
    npz = write_medmnist_npz(tmp_path / "synth.npz")
    pooled = client_source(make_cfg(tmp_path, npz=npz)).train
    with np.load(npz) as z:
        for split, start in (("train", 0), ("val", 300), ("test", 360)):
            for i in (0, SPLITS[split] - 1):
                np.testing.assert_array_equal(pooled.images[start + i][..., 0], z[f"{split}_images"][i])
                assert pooled.labels[start + i] == z[f"{split}_labels"][i, 0]


def test_no_example_in_two_clients_or_in_two_splits_of_one(tmp_path):
    part = build_partition(make_cfg(tmp_path, num_clients=8, alpha=0.3))
    owner: dict[int, tuple[int, str]] = {}
    for k, (train, val, test) in enumerate(splits_of(part)):
        for name, idx in (("train", train), ("val", val), ("test", test)):
            for i in idx.tolist():
                assert i not in owner, f"example {i} in client {k} {name} and in {owner[i]}"
                owner[i] = (k, name)
    assert len(owner) == 1797  # digits has no test split: the pool is its 1,797 examples


def test_each_client_tests_on_a_quarter_of_its_share(tmp_path):
    part = build_partition(make_cfg(tmp_path, num_clients=8, alpha=0.3))
    assert_75_25(part)
    other = build_partition(make_cfg(tmp_path, num_clients=8, alpha=0.3, test_fraction=0.4))
    assert_75_25(other, 0.4)
    # the test fraction cuts the same client shares differently
    assert [len(np.concatenate(s)) for s in splits_of(part)] == [
        len(np.concatenate(s)) for s in splits_of(other)
    ]


def test_val_is_carved_from_the_training_side_as_by_default(tmp_path):
    cfg = make_cfg(tmp_path, num_clients=5)
    cfg.data.val_fraction = 0.2
    for train, val, test in splits_of(build_partition(cfg)):
        rest = len(train) + len(val)
        assert len(val) == min(max(round(0.2 * rest), 1), rest - 1)
        assert abs(len(test) - 0.25 * (rest + len(test))) <= 0.5


def test_client_test_labels_follow_the_clients_own_labels(tmp_path):
    cfg = make_cfg(tmp_path, num_clients=6, alpha=0.2)
    labels = client_source(cfg).train.labels
    for train, val, test in splits_of(build_partition(cfg)):
        share = np.bincount(labels[np.concatenate([train, val, test])], minlength=10)
        got = np.bincount(labels[test], minlength=10)
        assert np.all(np.abs(got - 0.25 * share) <= 1.0 + 1e-9)  # stratified: within one per class


# --------------------------------------------------------------------------- seeding


def test_same_seed_same_partition_other_seed_another(tmp_path):
    first = splits_of(build_partition(make_cfg(tmp_path / "a", seed=3)))
    clear_all_caches()
    again = splits_of(build_partition(make_cfg(tmp_path / "b", seed=3)))  # rebuilt, not read back
    for one, two in zip(first, again, strict=True):
        for a, b in zip(one, two, strict=True):
            np.testing.assert_array_equal(a, b)
    other = splits_of(build_partition(make_cfg(tmp_path / "c", seed=4)))
    assert any(
        not np.array_equal(a, b)
        for one, two in zip(first, other, strict=True)
        for a, b in zip(one, two, strict=True)
    )


def test_the_train_test_cut_of_one_share_follows_the_seed(tmp_path):
    labels = client_source(make_cfg(tmp_path)).train.labels
    share = np.arange(0, 1797, 3)

    def cut(seed: int, client: int) -> list[int]:
        return pooled_client_split(labels, share, make_cfg(tmp_path, seed=seed), client)[2].tolist()

    assert cut(0, 0) == cut(0, 0)
    assert cut(0, 0) != cut(1, 0)
    assert cut(0, 0) != cut(0, 1)  # and each client has its own stream


# --------------------------------------------------------------------------- minimum size


def test_a_draw_below_min_size_is_redrawn_until_every_client_has_it(tmp_path):
    labels = client_source(make_cfg(tmp_path)).train.labels
    # This seed's first Dirichlet draw leaves a client with 75 examples (found by hand) ...
    first = DirichletPartitioner(
        num_partitions=8, partition_by="label", alpha=0.3, min_partition_size=0, seed=0
    )
    first.dataset = datasets.Dataset.from_dict({"label": labels})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert min(len(first.load_partition(i)) for i in range(8)) < 100
    # ... so min_size 100 needs re-draws, and every client still gets at least 100 pooled examples.
    part = build_partition(make_cfg(tmp_path, num_clients=8, alpha=0.3, min_size=100))
    shares = [len(np.concatenate(s)) for s in splits_of(part)]
    assert min(shares) >= 100 and sum(shares) == 1797


def test_min_size_counts_pooled_examples(tmp_path):
    """4 x 100 > the 300 official training examples, but fits the 500 pooled ones."""
    npz = write_medmnist_npz(tmp_path / "synth.npz")
    part = build_partition(make_cfg(tmp_path, npz=npz, num_clients=4, min_size=100, alpha=5.0))
    assert min(len(np.concatenate(s)) for s in splits_of(part)) >= 100


MORE_THAN_THE_POOL = r"^key 'data\.partition\.min_size': 4 clients x min_size 130 > 500 pooled examples"
NEVER_MET = r"^key 'data\.partition\.alpha' / 'data\.partition\.min_size' .* 500 pooled examples"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"num_clients": 4, "min_size": 130}, MORE_THAN_THE_POOL),
        ({"num_clients": 8, "min_size": 60, "alpha": 0.01}, NEVER_MET),
    ],
    ids=["more-than-the-pool", "never-met-in-ten-redraws"],
)
def test_an_impossible_min_size_is_refused_with_one_error_naming_the_key(tmp_path, kw, match):
    npz = write_medmnist_npz(tmp_path / "synth.npz")
    with pytest.raises(DataError, match=match) as info:
        build_partition(make_cfg(tmp_path, npz=npz, **kw))
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- config and cache


@pytest.mark.parametrize("value", [0, 1, -0.25, 1.5])
def test_test_fraction_outside_zero_one_names_the_key(value):
    with pytest.raises(ConfigError, match=r"key 'data\.partition\.test_fraction': must be in \(0, 1\)"):
        load_config({"overrides": f"data.partition.pool=true data.partition.test_fraction={value}"})


def test_a_cached_default_partition_is_never_served_for_the_pooled_one(tmp_path):
    npz = write_medmnist_npz(tmp_path / "synth.npz")
    pooled_cfg = make_cfg(tmp_path, npz=npz, num_clients=4, min_size=20)
    default_cfg = make_cfg(tmp_path, npz=npz, num_clients=4, min_size=20, pool=False)
    assert partition_fingerprint(pooled_cfg) != partition_fingerprint(default_cfg)
    assert cache_path(pooled_cfg, partition_fingerprint(pooled_cfg)) != cache_path(
        default_cfg, partition_fingerprint(default_cfg)
    )
    default = build_partition(default_cfg)
    assert sum(len(t) + len(v) for t, v in zip(default.train, default.val, strict=True)) == SPLITS["train"]
    clear_all_caches()
    pooled = build_partition(pooled_cfg)  # same cache directory, same seed
    assert sum(len(np.concatenate(s)) for s in splits_of(pooled)) == POOLED
    # a test fraction the default protocol does not use does not change its fingerprint
    unused = make_cfg(tmp_path, npz=npz, num_clients=4, min_size=20, pool=False, test_fraction=0.4)
    assert partition_fingerprint(unused) == partition_fingerprint(default_cfg)
    assert partition_fingerprint(make_cfg(tmp_path, npz=npz, test_fraction=0.4)) != partition_fingerprint(
        make_cfg(tmp_path, npz=npz)
    )


def test_a_pooled_cache_is_read_back_identically(tmp_path):
    cfg = make_cfg(tmp_path, num_clients=5)
    first = splits_of(build_partition(cfg))
    assert cache_path(cfg, partition_fingerprint(cfg)).is_file()
    clear_all_caches()
    for one, two in zip(first, splits_of(build_partition(cfg)), strict=True):
        for a, b in zip(one, two, strict=True):
            np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- clients and the CLI


def test_client_datasets_serve_the_pooled_examples(tmp_path):
    npz = write_medmnist_npz(tmp_path / "synth.npz")
    cfg = make_cfg(tmp_path, npz=npz, num_clients=3, min_size=20)
    part, pooled = build_partition(cfg), client_source(cfg).train
    for k in range(3):
        ds = load_client_datasets(cfg, k)
        idx = part.client(k)
        for name, want in (("train", idx.train), ("val", idx.val), ("test", idx.test)):
            np.testing.assert_array_equal(getattr(ds, name).labels, pooled.labels[want])
    # official test examples train some client, and official train examples test some client
    trains, tests = np.concatenate(part.train), np.concatenate(part.test)
    assert (trains >= 360).any() and (tests < 300).any()


def test_a_device_with_its_own_file_splits_its_pool_75_25(tmp_path):
    npz = write_medmnist_npz(tmp_path / "own.npz")
    cfg = make_cfg(tmp_path, npz=npz)
    idx = local_client_indices(cfg, client_source(cfg, str(npz)), 0)
    joined = np.concatenate([idx.train, idx.val, idx.test])
    np.testing.assert_array_equal(np.sort(joined), np.arange(POOLED))
    assert len(idx.test) == round(0.25 * POOLED)
    ds = load_client_datasets(cfg, 0, data_path=str(npz))
    assert ds.sizes == {"train": len(idx.train), "val": len(idx.val), "test": len(idx.test)}


def test_fedvit_partition_shows_the_pooled_protocol(tmp_path, capsys):
    rc = (
        "num-clients=4 partition=dirichlet "
        f"overrides='data.partition.pool=true data.partition.min_size=20 data.cache_dir={tmp_path}'"
    )
    assert main(["partition", "-c", rc]) == 0
    out = capsys.readouterr().out
    assert "pooled" in out and "75/25" in out
    cfg = load_config(
        {
            "num-clients": 4,
            "overrides": f"data.partition.pool=true data.partition.min_size=20 data.cache_dir={tmp_path}",
        }
    )
    assert sum(r["n_train"] + r["n_val"] + r["n_test"] for r in summarize_partition(cfg)) == 1797
    assert main(["partition", "-c", f"num-clients=4 overrides='data.cache_dir={tmp_path}'"]) == 0
    assert "pooled" not in capsys.readouterr().out


# --------------------------------------------------------------------------- staged OrganAMNIST


def test_organamnist_table2_pools_all_three_official_splits(shared_data, tmp_path):
    cfg = load_config(
        {
            "experiment": "organamnist-table2",
            "data-dir": str(shared_data),
            "overrides": f"data.cache_dir={tmp_path}",
        }
    )
    assert cfg.data.partition.pool and cfg.clients.num_clients == 64
    part = build_partition(cfg)
    assert client_source(cfg).info["pooled"] == {"train": 34561, "val": 6491, "test": 17778}
    shares = [len(np.concatenate(s)) for s in splits_of(part)]
    assert sum(shares) == 58830 and min(shares) >= cfg.data.partition.min_size
    assert_75_25(part)
    everything = np.concatenate([np.concatenate(s) for s in splits_of(part)])
    assert len(np.unique(everything)) == 58830


# --------------------------------------------------------------------------- Table 2 configs


def test_table2_sweep_runs_every_method_three_times_and_perfedavg_at_the_authors_lr(tmp_path):
    from fedvit.config import CONF_DIR
    from fedvit.sweep import load_spec, plan, run_config, spec_from_mapping

    spec = spec_from_mapping(load_spec(CONF_DIR / "sweep" / "organamnist-table2.yaml"))
    runs = plan(spec)
    assert len(runs) == 13 * 3 and {r.seed for r in runs} == {0, 1, 2}
    lrs = {}
    for r in runs:
        cfg = load_config(run_config(spec.base, r.values, name=r.name, out_dir=tmp_path, seed=r.seed))
        assert cfg.data.partition.pool and cfg.clients.num_clients == 64 and cfg.server.num_rounds == 50
        assert (cfg.train.optimizer, cfg.train.momentum, cfg.train.weight_decay) == ("sgd", 0.0, 0.0)
        lrs[cfg.method.name] = cfg.train.lr
    assert lrs.pop("perfedavg") == 0.001 and set(lrs.values()) == {0.01}
    assert len(lrs) == 12


@pytest.mark.parametrize("experiment", ["organamnist-table2", "cifar100-table2", "officehome-table2"])
def test_table2_experiments_resolve_with_the_pooled_protocol(experiment):
    cfg = load_config({"experiment": experiment})
    assert cfg.data.partition.pool and cfg.data.partition.kind == "dirichlet"
    assert cfg.train.local_epochs == 10 and cfg.train.batch_size == 64 and cfg.train.lr == 0.01
    if experiment != "organamnist-table2":
        assert cfg.data.source == "hub" and cfg.data.hub_id  # not staged: loaded through the hub
