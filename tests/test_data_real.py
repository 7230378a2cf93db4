"""The data layer on the staged real datasets (../shared/data, or $FEDVIT_SHARED_DATA).

Each test loads its dataset through its own conf/dataset YAML with ``data_dir`` pointing at the
staged files, the way ``--run-config "dataset='organamnist' data-dir='../shared/data'"`` does.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fedvit.config import CONF_DIR, FedvitConfig
from fedvit.data import (
    build_partition,
    clear_all_caches,
    load_client_datasets,
    load_source,
    summarize_partition,
)

SHARED = Path(os.environ.get("FEDVIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not SHARED.is_dir(), reason=f"staged datasets not found at {SHARED}"),
]


@pytest.fixture(autouse=True)
def _fresh_process_caches():
    clear_all_caches()
    yield
    clear_all_caches()


def dataset_cfg(name: str, tmp_path: Path, num_clients: int = 10, **data) -> FedvitConfig:
    """conf/dataset/<name>.yaml on the schema defaults, with data_dir = the staged folder."""
    layer = OmegaConf.load(CONF_DIR / "dataset" / f"{name}.yaml")
    over = {
        "data": {"data_dir": str(SHARED), "cache_dir": str(tmp_path / "cache"), **data},
        "clients": {"num_clients": num_clients},
    }
    merged = OmegaConf.merge(OmegaConf.structured(FedvitConfig), layer, over)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def test_organamnist_npz_has_the_official_splits(tmp_path):
    cfg = dataset_cfg("organamnist", tmp_path)
    src = load_source(cfg.data)
    assert (len(src.train), len(src.test)) == (34561, 17778)  # official val (6491) not used
    assert src.train.images[0].shape == (28, 28, 1) and src.train.images[0].dtype == np.uint8
    test_counts = np.bincount(src.test.labels, minlength=11).tolist()
    assert test_counts == [1036, 784, 793, 785, 2064, 1965, 3285, 1747, 1813, 1622, 1884]
    ds = load_client_datasets(cfg, 0)
    x, y = ds.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y < 11
    rows = summarize_partition(cfg)
    assert sum(r["n_train"] + r["n_val"] for r in rows) == 34561
    assert sum(r["n_test"] for r in rows) == 17778


def test_femnist_natural_partition_gives_writer_pure_clients(tmp_path):
    cfg = dataset_cfg("femnist", tmp_path, num_clients=20)
    src = load_source(cfg.data)
    assert (len(src.train), len(src.test)) == (14708, 1685) and len(set(src.train.ids)) == 105
    part = build_partition(cfg)
    assert len(set(part.natural_ids)) == 20
    for k in range(20):
        c = part.client(k)
        assert set(src.train.ids[np.concatenate([c.train, c.val])]) == {c.natural_id}
        np.testing.assert_array_equal(c.test, np.flatnonzero(src.test.ids == c.natural_id))  # LEAF's own test
    x, _ = load_client_datasets(cfg, 0).train[0]
    ink = x * cfg.data.std[0] + cfg.data.mean[0]  # undo normalization: inverted, so ink is bright
    assert x.shape == (1, 28, 28) and ink.mean() < 0.3 and ink.max() > 0.5


def test_femnist_every_writer_is_a_client(tmp_path):
    part = build_partition(dataset_cfg("femnist", tmp_path, num_clients=105))
    assert len(set(part.natural_ids)) == 105


def test_cifar10_parquet_keeps_the_official_order(tmp_path):
    cfg = dataset_cfg("cifar10", tmp_path)
    src = load_source(cfg.data)
    assert (len(src.train), len(src.test)) == (50000, 10000)
    assert src.test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert src.train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert src.class_names[:3] == ["airplane", "automobile", "bird"]
    assert src.test.images[0].shape == (32, 32, 3)
    ds = load_client_datasets(cfg, 4)
    x, y = ds.test[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    assert np.bincount(np.concatenate([build_partition(cfg).client(k).test for k in range(10)])).max() == 1
