"""The data layer: sources, partitions, per-client splits, cache, transforms (fast, offline).

Uses scikit-learn's bundled digits and tiny arrays made here; never the network.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from rich.console import Console

import fedvit.data.partition as partition_mod
from fedvit.config import CONF_DIR, ClientsConfig, ConfigError, DataConfig, FedvitConfig, PartitionConfig
from fedvit.data import (
    DataError,
    ImageTransform,
    build_partition,
    cache_path,
    clear_all_caches,
    format_partition_table,
    load_client_datasets,
    load_source,
    partition_fingerprint,
    summarize_partition,
    with_test_split,
)

# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _fresh_process_caches():
    """Each test starts as a fresh process would (the on-disk cache is per test, in tmp_path)."""
    clear_all_caches()
    yield
    clear_all_caches()


def make_cfg(
    tmp_path: Path, *, num_clients: int = 4, seed: int = 0, partition: dict | None = None, **data
) -> FedvitConfig:
    """A config on sklearn digits (unless ``data`` says otherwise) with its cache under tmp_path."""
    data.setdefault("cache_dir", str(tmp_path / "cache"))
    return FedvitConfig(
        seed=seed,
        data=DataConfig(partition=PartitionConfig(**(partition or {})), **data),
        clients=ClientsConfig(num_clients=num_clients),
    )


def write_leaf_npz(
    path: Path, writers: int = 6, per_writer: int = 30, classes: int = 5, seed: int = 0
) -> Path:
    """A FEMNIST-like npz: x_* (N,8,8,1) uint8, y_*, u_* writer ids, per-writer train/test split."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", per_writer), ("test", per_writer // 3)):
        ids = np.repeat([f"w{w:02d}" for w in range(writers)], n)
        arrays[f"x_{split}"] = rng.integers(0, 256, (len(ids), 8, 8, 1), dtype=np.uint8)
        arrays[f"y_{split}"] = rng.integers(0, classes, len(ids)).astype(np.int64)
        arrays[f"u_{split}"] = ids
    np.savez(path, **arrays)
    return path


def leaf_cfg(tmp_path: Path, npz: Path, **kw) -> FedvitConfig:
    kw.setdefault("partition", {"kind": "natural"})
    return make_cfg(
        tmp_path,
        name="leaf",
        source="femnist-npz",
        path=npz.name,
        data_dir=str(npz.parent),
        num_classes=5,
        image_size=8,
        **kw,
    )


def hf_dataset_dict(
    n_train: int = 40, n_test: int = 20, size: int = 6, seed: int = 0
) -> datasets.DatasetDict:
    """A tiny in-memory DatasetDict with the hub's CIFAR schema (Image ``img``, ClassLabel ``label``)."""
    rng = np.random.default_rng(seed)
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "label": datasets.ClassLabel(names=["cat", "dog", "owl"]),
            "writer": datasets.Value("string"),
        }
    )

    def split(n: int) -> datasets.Dataset:
        arrays = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        return datasets.Dataset.from_dict(
            {
                "img": [Image.fromarray(a) for a in arrays],
                "label": (np.arange(n) % 3).tolist(),
                "writer": [f"u{i % 4}" for i in range(n)],
            },
            features=features,
        )

    return datasets.DatasetDict({"train": split(n_train), "test": split(n_test)})


def all_indices(part, name: str) -> list[np.ndarray]:
    return [getattr(part.client(k), name) for k in range(part.num_clients)]


def assert_disjoint(arrays: list[np.ndarray]) -> None:
    flat = np.concatenate(arrays)
    assert len(np.unique(flat)) == len(flat), "index sets overlap"


# --------------------------------------------------------------------------- sources


def test_digits_source_is_native_uint8_without_test_split():
    src = load_source(DataConfig())
    assert len(src.train) == 1797 and src.test is None
    img = src.train.images[0]
    assert img.shape == (8, 8, 1) and img.dtype == np.uint8 and src.train.images.images.max() == 255
    assert src.train.labels.dtype == np.int64 and src.class_names == [str(i) for i in range(10)]


def test_held_out_test_split_is_stratified_seeded_and_disjoint():
    src = load_source(DataConfig())
    a, b, c = (with_test_split(src, 0.2, seed) for seed in (0, 0, 1))
    assert (len(a.train), len(a.test)) == (1438, 359) and a.test_held_out
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    assert not np.array_equal(a.test.images.indices, c.test.images.indices)
    assert not set(a.train.images.indices) & set(a.test.images.indices)
    share = np.bincount(a.test.labels, minlength=10) / np.bincount(src.train.labels, minlength=10)
    assert np.allclose(share, 0.2, atol=0.01)


def test_sources_are_loaded_once_per_process():
    assert load_source(DataConfig()).train is load_source(DataConfig()).train


def test_parquet_folder_decodes_images_lazily_and_reads_class_names(tmp_path):
    dd = hf_dataset_dict()
    folder = tmp_path / "tiny"
    folder.mkdir()
    for split in ("train", "test"):
        dd[split].to_parquet(folder / f"{split}-00000-of-00001.parquet")
    src = load_source(DataConfig(source="parquet", path="tiny", data_dir=str(tmp_path), image_key="img"))
    assert (len(src.train), len(src.test)) == (40, 20) and src.class_names == ["cat", "dog", "owl"]
    assert src.train.images._decoded[3] is None  # nothing decoded before it is needed
    np.testing.assert_array_equal(src.test.images[3], np.asarray(dd["test"][3]["img"]))  # PNG: lossless
    assert src.train.images[3] is src.train.images[3]  # decoded once, then memoized
    np.testing.assert_array_equal(src.train.labels, dd["train"]["label"])
    assert pq.read_table(folder / "train-00000-of-00001.parquet").num_rows == 40


def test_hub_source_converts_a_dataset_dict(monkeypatch):
    calls = []

    def fake_load_dataset(hub_id, hub_config=None, **kwargs):
        calls.append((hub_id, hub_config))
        return hf_dataset_dict()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(source="hub", hub_id="uoft-cs/cifar10", image_key="img", in_chans=3)
    src = load_source(cfg)
    assert calls == [("uoft-cs/cifar10", None)]
    assert (len(src.train), len(src.test)) == (40, 20) and src.class_names == ["cat", "dog", "owl"]
    assert src.train.images[0].shape == (6, 6, 3) and src.train.images[0].dtype == np.uint8
    assert list(src.train.ids[:4]) == ["u0", "u1", "u2", "u3"]  # the data.partition.id_key column


def test_hub_clients_get_normalized_tensors(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: hf_dataset_dict())
    cfg = make_cfg(
        tmp_path,
        num_clients=2,
        source="hub",
        hub_id="x/y",
        image_key="img",
        num_classes=3,
        in_chans=3,
        image_size=8,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        partition={"kind": "iid"},
    )
    ds = load_client_datasets(cfg, 1)
    x, y = ds.train[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    assert ds.class_names == ["cat", "dog", "owl"]


def test_missing_local_copy_falls_back_to_hub_when_hub_id_is_set(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: hf_dataset_dict())
    cfg = DataConfig(
        source="parquet", path="nowhere", data_dir=str(tmp_path), hub_id="uoft-cs/cifar10", image_key="img"
    )
    assert len(load_source(cfg).train) == 40

    def offline(*a, **k):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"data\.path.*nowhere.*hub fallback failed.*no internet"):
        load_source(DataConfig(source="parquet", path="nowhere", data_dir=str(tmp_path), hub_id="other/id"))


@pytest.mark.parametrize(
    ("data", "override", "key"),
    [
        (
            {"source": "parquet", "path": "cifar10", "data_dir": "no/such/dir"},
            None,
            r"'data\.path' / 'data\.data_dir'",
        ),
        (
            {"source": "medmnist-npz", "path": "/no/such/organamnist.npz"},
            None,
            r"'data\.path'.*/no/such/organamnist",
        ),
        ({"source": "femnist-npz", "path": "x.npz"}, "/no/such/device/data.npz", r"node-config 'data-path'"),
        ({"source": "sklearn-digits"}, "/some/device/data.npz", r"node-config 'data-path'.*sklearn-digits"),
    ],
)
def test_missing_files_raise_one_error_naming_the_key(tmp_path, data, override, key):
    with pytest.raises(DataError, match=key) as info:
        load_source(DataConfig(**data), path_override=override)
    assert isinstance(info.value, ConfigError) and "\n" not in str(info.value)


def test_wrong_npz_layout_names_the_key(tmp_path):
    np.savez(tmp_path / "odd.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"'data\.path'.*no 'train_images'.*data\.source"):
        load_source(DataConfig(source="medmnist-npz", path="odd.npz", data_dir=str(tmp_path)))


def test_labels_beyond_num_classes_name_the_key(tmp_path):
    cfg = make_cfg(tmp_path, num_classes=5)
    with pytest.raises(DataError, match=r"'data\.num_classes'.*0\.\.9"):
        build_partition(cfg)


# --------------------------------------------------------------------------- partitions

KINDS = [
    {"kind": "iid"},
    {"kind": "dirichlet", "alpha": 0.3, "min_size": 20},
    {"kind": "pathological", "classes_per_client": 2},
]


@pytest.mark.parametrize("partition", KINDS, ids=lambda p: p["kind"])
def test_partitions_are_reproducible_per_seed(tmp_path, partition):
    def fresh(seed: int):
        clear_all_caches()  # a new process, with an empty cache directory
        return build_partition(
            make_cfg(tmp_path / str(len(built)), num_clients=5, seed=seed, partition=partition)
        )

    built: list = []
    for seed in (0, 0, 1):
        built.append(fresh(seed))
    same, other = built[:2], built[2]
    for name in ("train", "val", "test"):
        for a, b in zip(all_indices(same[0], name), all_indices(same[1], name), strict=True):
            np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(same[0].train, other.train, strict=True))


@pytest.mark.parametrize("partition", KINDS, ids=lambda p: p["kind"])
def test_every_kind_gives_disjoint_clients_inside_the_splits(tmp_path, partition):
    cfg = make_cfg(tmp_path, num_clients=5, partition=partition)
    part = build_partition(cfg)
    n_train, n_test = 1438, 359  # digits after holding out data.test_fraction = 0.2
    owned = [np.concatenate([c.train, c.val]) for c in map(part.client, range(5))]
    assert_disjoint(owned)
    assert_disjoint(all_indices(part, "test"))
    assert all(len(c.train) >= 1 for c in map(part.client, range(5)))
    assert np.concatenate(owned).max() < n_train and np.concatenate(all_indices(part, "test")).max() < n_test
    if partition["kind"] != "pathological":  # pathological may leave classes unused
        assert sum(map(len, owned)) == n_train
        assert sum(len(t) for t in part.test) == n_test


def _class_shares(cfg) -> np.ndarray:
    rows = summarize_partition(cfg)
    hists = np.array([r["train_hist"] for r in rows], dtype=float)
    return hists.max(axis=1) / hists.sum(axis=1)


def test_dirichlet_small_alpha_is_skewed_and_keeps_min_size(tmp_path):
    skewed = make_cfg(
        tmp_path / "a", num_clients=6, partition={"kind": "dirichlet", "alpha": 0.05, "min_size": 30}
    )
    flat = make_cfg(
        tmp_path / "b", num_clients=6, partition={"kind": "dirichlet", "alpha": 1000.0, "min_size": 30}
    )
    assert _class_shares(skewed).mean() > 0.4 > 0.15 > _class_shares(flat).mean()
    part = build_partition(skewed)
    assert min(len(c.train) + len(c.val) for c in map(part.client, range(6))) >= 30


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_exactly_k_classes_per_client(tmp_path, k):
    cfg = make_cfg(tmp_path, num_clients=7, partition={"kind": "pathological", "classes_per_client": k})
    for row in summarize_partition(cfg):
        hist = np.array(row["train_hist"])
        assert np.count_nonzero(hist) <= k
    part = build_partition(cfg)
    labels = with_test_split(load_source(cfg.data), 0.2, 0).train.labels
    for c in map(part.client, range(7)):
        assert len(np.unique(labels[np.concatenate([c.train, c.val])])) == k


def test_test_split_follows_each_clients_train_distribution(tmp_path):
    cfg = make_cfg(tmp_path, num_clients=6, partition={"kind": "dirichlet", "alpha": 0.2, "min_size": 20})
    src = with_test_split(load_source(cfg.data), 0.2, 0)
    part = build_partition(cfg)
    totals_train = np.bincount(src.train.labels, minlength=10)
    totals_test = np.bincount(src.test.labels, minlength=10)
    for c in map(part.client, range(6)):
        owned = np.bincount(src.train.labels[np.concatenate([c.train, c.val])], minlength=10)
        got = np.bincount(src.test.labels[c.test], minlength=10)
        expected = totals_test * owned / totals_train  # the client's share of each class, applied to test
        assert np.all(np.abs(got - expected) < 1), (got, expected)
    assert_disjoint(all_indices(part, "test"))


def test_capped_federation_gets_a_proportional_test_set(tmp_path):
    cfg = make_cfg(
        tmp_path, num_clients=3, max_train_per_client=50, val_fraction=0.2, partition={"kind": "iid"}
    )
    part = build_partition(cfg)
    for c in map(part.client, range(3)):
        assert (len(c.train), len(c.val)) == (40, 10)
        assert abs(len(c.test) - 50 * 359 / 1438) <= 10  # ~ the global test:train ratio, rounded per class


def test_val_split_is_stratified_and_keeps_a_train_example(tmp_path):
    cfg = make_cfg(tmp_path, num_clients=2, val_fraction=0.25, partition={"kind": "iid"})
    src = with_test_split(load_source(cfg.data), 0.2, 0)
    part = build_partition(cfg)
    for c in map(part.client, range(2)):
        n = len(c.train) + len(c.val)
        assert len(c.val) == round(0.25 * n)
        owned = np.bincount(src.train.labels[np.concatenate([c.train, c.val])], minlength=10)
        val = np.bincount(src.train.labels[c.val], minlength=10)
        assert np.all(np.abs(val - 0.25 * owned) < 1.5)
    from fedvit.data.partition import train_val_split

    one = train_val_split(
        np.zeros(10, np.int64), np.array([7, 9]), DataConfig(val_fraction=0.9), np.random.default_rng(0)
    )
    assert (len(one[0]), len(one[1])) == (1, 1)


def test_natural_partition_gives_writer_pure_clients_with_their_own_test(tmp_path):
    npz = write_leaf_npz(tmp_path / "leaf.npz", writers=6)
    cfg = leaf_cfg(tmp_path, npz, num_clients=4)
    part = build_partition(cfg)
    src = load_source(cfg.data)
    assert len(set(part.natural_ids)) == 4
    assert part.natural_ids == sorted(part.natural_ids)  # drawn with the seed, kept in id order
    for c in map(part.client, range(4)):
        assert set(src.train.ids[np.concatenate([c.train, c.val])]) == {c.natural_id}
        assert set(src.test.ids[c.test]) == {c.natural_id} and len(c.test) == 10
    clear_all_caches()
    again = build_partition(leaf_cfg(tmp_path / "2", npz, num_clients=4))
    assert again.natural_ids == part.natural_ids
    everyone = build_partition(leaf_cfg(tmp_path / "3", npz, num_clients=6))
    assert everyone.natural_ids == [f"w{w:02d}" for w in range(6)]


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"num_clients": 2000, "partition": {"kind": "iid"}}, r"'clients\.num_clients'.*2000 clients.*1438"),
        (
            {"num_clients": 10, "partition": {"kind": "dirichlet", "min_size": 200}},
            r"'data\.partition\.min_size'",
        ),
        (
            {"num_clients": 30, "partition": {"kind": "dirichlet", "alpha": 0.01, "min_size": 40}},
            r"'data\.partition\.alpha' / 'data\.partition\.min_size'",
        ),
        (
            {
                "num_clients": 3,
                "num_classes": 20,
                "partition": {"kind": "pathological", "classes_per_client": 12},
            },
            r"'data\.partition\.classes_per_client'.*only 10 classes",
        ),
        ({"partition": {"kind": "natural"}}, r"'data\.partition\.id_key'.*no natural client id"),
    ],
)
def test_impossible_partitions_raise_one_error_naming_the_key(tmp_path, kw, key):
    with pytest.raises(DataError, match=key) as info:
        build_partition(make_cfg(tmp_path, **kw))
    assert "\n" not in str(info.value)


def test_natural_partition_with_more_clients_than_writers_names_the_key(tmp_path):
    npz = write_leaf_npz(tmp_path / "leaf.npz", writers=3)
    with pytest.raises(DataError, match=r"'clients\.num_clients'.*only 3 distinct 'writer' ids"):
        build_partition(leaf_cfg(tmp_path, npz, num_clients=5))


# --------------------------------------------------------------------------- cache


def test_cache_hit_returns_identical_indices_and_stores_indices_only(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, num_clients=5, partition={"kind": "dirichlet", "alpha": 0.5})
    first = build_partition(cfg)
    path = cache_path(cfg, partition_fingerprint(cfg))
    assert path.is_file() and path.stat().st_size < 30_000  # 1797 int64 indices + meta, no pixels
    with np.load(path, allow_pickle=False) as npz:
        assert {npz[k].dtype.kind for k in npz.files} <= {"i", "U"}
    assert not list(path.parent.glob("*.tmp"))
    assert path.stat().st_mode & 0o777 == 0o600  # written through a private temporary file, as always

    clear_all_caches()

    def must_not_rebuild(*a, **k):
        raise AssertionError("rebuilt despite a valid cache")

    monkeypatch.setattr(partition_mod, "compute_partition", must_not_rebuild)
    second = build_partition(cfg)
    for name in ("train", "val", "test"):
        for a, b in zip(getattr(first, name), getattr(second, name), strict=True):
            np.testing.assert_array_equal(a, b)
    assert build_partition(cfg) is second  # then from memory


def test_cache_key_changes_with_partition_config_and_files(tmp_path):
    base = make_cfg(tmp_path)
    fps = {
        partition_fingerprint(base),
        partition_fingerprint(make_cfg(tmp_path, seed=1)),
        partition_fingerprint(make_cfg(tmp_path, num_clients=5)),
        partition_fingerprint(make_cfg(tmp_path, partition={"alpha": 0.1})),
        partition_fingerprint(make_cfg(tmp_path, val_fraction=0.2)),
    }
    assert len(fps) == 5
    npz = write_leaf_npz(tmp_path / "leaf.npz")
    before = partition_fingerprint(leaf_cfg(tmp_path, npz))
    write_leaf_npz(tmp_path / "leaf.npz", per_writer=33)
    assert partition_fingerprint(leaf_cfg(tmp_path, npz)) != before


@pytest.mark.parametrize("damage", ["garbage", "truncated", "overlap"])
def test_corrupted_cache_is_rebuilt_not_trusted(tmp_path, damage):
    cfg = make_cfg(tmp_path, num_clients=3, partition={"kind": "iid"})
    good = build_partition(cfg)
    path = cache_path(cfg, partition_fingerprint(cfg))
    if damage == "garbage":
        path.write_bytes(b"not an npz")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:  # a readable file whose clients share examples
        bad = partition_mod.Partition(good.fingerprint, [good.train[0]] * 3, good.val, good.test)
        partition_mod.write_cache(path, bad, 1438, 359)
    clear_all_caches()
    rebuilt = build_partition(cfg)
    for a, b in zip(good.train, rebuilt.train, strict=True):
        np.testing.assert_array_equal(a, b)
    assert partition_mod.read_cache(path, good.fingerprint, 1438, 359) is not None  # rewritten


# --------------------------------------------------------------------------- client datasets


def test_client_datasets_resize_and_normalize_on_the_fly(tmp_path):
    cfg = make_cfg(tmp_path, num_clients=3, partition={"kind": "iid"}, mean=[0.3], std=[0.4])
    ds = load_client_datasets(cfg, 2)
    x, y = ds.train[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    assert ds.num_classes == 10 and ds.sizes == {
        "train": len(ds.train),
        "val": len(ds.val),
        "test": len(ds.test),
    }
    hists = ds.label_histograms
    assert all(h.shape == (10,) and h.sum() == ds.sizes[s] for s, h in hists.items())
    assert x.min() >= (0 - 0.3) / 0.4 - 1e-5 and x.max() <= (1 - 0.3) / 0.4 + 1e-5
    loader = torch.utils.data.DataLoader(ds.test, batch_size=16)
    xb, yb = next(iter(loader))
    assert xb.shape == (16, 1, 16, 16) and yb.dtype == torch.int64


def test_transform_channels_size_inversion_and_normalization():
    white_gray = np.full((4, 4, 1), 255, np.uint8)
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[..., 1] = 255
    x = ImageTransform(8, [0.5] * 3, [0.5] * 3, in_chans=3)(white_gray)
    assert x.shape == (3, 8, 8) and torch.allclose(x, torch.ones_like(x))  # (1 - 0.5) / 0.5
    y = ImageTransform(5, [0.0], [1.0], in_chans=1)(rgb)
    assert y.shape == (1, 5, 5) and torch.allclose(y, torch.full_like(y, 0.587), atol=1e-4)  # luminance
    z = ImageTransform(4, [0.0], [1.0], in_chans=1, invert=True)(white_gray)
    assert torch.allclose(z, torch.zeros_like(z))


def test_client_id_out_of_range_names_the_clients(tmp_path):
    cfg = make_cfg(tmp_path, num_clients=3, partition={"kind": "iid"})
    with pytest.raises(DataError, match=r"client id 3 .*clients\.num_clients=3"):
        load_client_datasets(cfg, 3)
    with pytest.raises(DataError, match="client id must be an integer"):
        load_client_datasets(cfg, -1)


def test_device_data_path_is_the_whole_client(tmp_path):
    device = write_leaf_npz(tmp_path / "device.npz", writers=2, per_writer=30)
    cfg = leaf_cfg(tmp_path, tmp_path / "federation-file-not-needed.npz", num_clients=50, val_fraction=0.1)
    ds = load_client_datasets(cfg, 7, data_path=str(device))
    assert ds.sizes == {"train": 54, "val": 6, "test": 20}
    x, _ = ds.test[0]
    assert x.shape == (1, 8, 8)


def test_per_process_cache_serves_many_clients_from_one_load(tmp_path):
    cfg = make_cfg(tmp_path, num_clients=4, partition={"kind": "iid"})
    a, b = load_client_datasets(cfg, 0), load_client_datasets(cfg, 3)
    assert a.train.split.images.base is b.train.split.images.base
    assert not set(a.train.indices) & set(b.train.indices)


# --------------------------------------------------------------------------- summary and YAML


def test_summary_and_table(tmp_path):
    cfg = make_cfg(tmp_path, num_clients=4, partition={"kind": "pathological", "classes_per_client": 2})
    rows = summarize_partition(cfg)
    assert [r["client_id"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert sum(r["train_hist"]) == r["n_train"] and sum(r["test_hist"]) == r["n_test"]
        assert len(r["train_hist"]) == 10
    console = Console(record=True, width=150)
    console.print(format_partition_table(rows, class_names=[f"c{i}" for i in range(10)]))
    text = console.export_text()
    assert "4 clients" in text and "c0:" in text


DATASET_YAMLS = sorted((CONF_DIR / "dataset").glob("*.yaml"))


def test_dataset_yamls_exist():
    names = {p.stem for p in DATASET_YAMLS}
    assert {"digits", "cifar10", "cifar10-hub", "organamnist", "femnist", "pathmnist", "dermamnist"} <= names


@pytest.mark.parametrize("path", DATASET_YAMLS, ids=lambda p: p.stem)
def test_dataset_yaml_is_a_valid_data_section(path):
    layer = OmegaConf.load(path)
    assert list(layer.keys()) == ["data"]
    cfg: FedvitConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FedvitConfig), layer))
    d = cfg.data
    assert d.name == path.stem
    assert len(d.mean) == d.in_chans == len(d.std)
    assert d.source == "hub" or d.source == "sklearn-digits" or (d.path and not Path(d.path).is_absolute())
    assert d.source != "hub" or d.hub_id


def test_helpers_round_quotas_within_one():
    from fedvit.data.partition import largest_remainder, stratified_sample

    rng = np.random.default_rng(0)
    for quota in (rng.random(7) * 10 for _ in range(20)):
        total = round(quota.sum())
        alloc = largest_remainder(quota, total)
        assert alloc.sum() == total and np.all(np.abs(alloc - quota) < 1)
    labels = np.array(list(itertools.chain.from_iterable([c] * (c + 1) for c in range(5))))
    picked = stratified_sample(labels, 6, rng)
    assert len(picked) == 6 and len(set(picked)) == 6
