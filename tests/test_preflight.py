"""Fail fast (issue 14): bad data, impossible partitions and mismatched models are found by
fedvit.preflight on the submitting machine, as one ConfigError line naming the key, before any
SuperLink, Ray process or client is started."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tinyapp import describe_procs, marked

from fedvit.config import ConfigError, load_config
from fedvit.preflight import check, data_is_local

REPO = Path(__file__).resolve().parents[1]


def cfg_of(tmp_path: Path, overrides: str = "", **keys):
    """A config (digits by default) whose partition cache lives in ``tmp_path``."""
    return load_config({**keys, "overrides": f"data.cache_dir={tmp_path / 'cache'} {overrides}"})


def write_writers_npz(
    path: Path, writers: int = 4, per_writer: int = 12, labels: int = 62, channels: int = 1
) -> Path:
    """A LEAF-FEMNIST-shaped npz (x_*, y_*, u_*, 62 class names) with random 28x28 images."""
    rng = np.random.default_rng(0)
    arrays = {"classes": np.array([str(i) for i in range(62)])}
    for split, n in (("train", per_writer), ("test", per_writer // 3)):
        size = writers * n
        shape = (size, 28, 28) if channels == 1 else (size, 28, 28, channels)
        arrays[f"x_{split}"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"y_{split}"] = rng.integers(0, labels, size)
        arrays[f"u_{split}"] = np.repeat([f"w{i}" for i in range(writers)], n)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def femnist_cfg(tmp_path: Path, npz: Path, overrides: str = "", **keys):
    """The femnist dataset config reading ``npz`` (natural partition by writer unless overridden)."""
    return load_config(
        {
            "dataset": "femnist",
            "data-dir": str(npz.parent),
            **keys,
            "overrides": f"data.path={npz.name} data.cache_dir={tmp_path / 'cache'} {overrides}",
        }
    )


def fails(cfg, *needles: str) -> str:
    """The message of the ConfigError ``check(cfg)`` raises: one line holding every needle."""
    with pytest.raises(ConfigError) as info:
        check(cfg)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# --------------------------------------------------------------------------- data


def test_a_missing_data_dir_names_data_dir_and_its_run_config_key(tmp_path: Path) -> None:
    cfg = load_config({"dataset": "organamnist", "data-dir": str(tmp_path / "nowhere")})
    fails(cfg, "'data.data_dir'", "'data-dir'", str(tmp_path / "nowhere" / "organamnist.npz"))


def test_a_relative_data_dir_is_looked_up_under_the_callers_directory(tmp_path: Path) -> None:
    npz = write_writers_npz(tmp_path / "mine" / "w.npz")
    cfg = load_config(
        {"dataset": "femnist", "data-dir": "mine", "num-clients": 4, "overrides": f"data.path={npz.name}"}
    )
    fails(cfg, "'data.data_dir'")  # the test process's working directory has no mine/w.npz
    check(cfg, cwd=tmp_path)


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["bit flips in an array", "not an npz at all"])
def test_a_corrupt_file_names_data_path(tmp_path: Path, damage: str) -> None:
    npz = write_writers_npz(tmp_path / "d" / "w.npz", per_writer=300)
    if damage == "bit flips in an array":
        _flip_middle(npz)  # the zip directory is intact: np.load opens it, reading x_train fails
    else:
        npz.write_bytes(os.urandom(4096))
    fails(femnist_cfg(tmp_path, npz), "'data.path'", "w.npz")


def test_a_corrupt_parquet_file_names_data_path(tmp_path: Path) -> None:
    folder = tmp_path / "cifar"
    folder.mkdir()
    (folder / "train-00000-of-00001.parquet").write_bytes(os.urandom(4096))
    cfg = load_config(
        {
            "dataset": "cifar10",
            "data-dir": str(tmp_path),
            "overrides": f"data.path=cifar data.cache_dir={tmp_path}",
        }
    )
    fails(cfg, "'data.path'", "cifar")


# --------------------------------------------------------------------------- partitions


@pytest.mark.parametrize(
    ("keys", "overrides", "needles"),
    [
        ({"num-clients": 1500, "partition": "iid"}, "", ["'clients.num_clients'", "'num-clients'", "1438"]),
        ({"num-clients": 200}, "", ["'data.partition.min_size'", "200 clients x min_size 10"]),
        (  # feasible by counts (100 x 10 <= 1438), but the Dirichlet draws never reach it
            {"num-clients": 100, "alpha": 0.1},
            "",
            ["'data.partition.min_size'", "'clients.num_clients'", "max number of attempts"],
        ),
        (
            {"num-clients": 1000},
            "data.partition.kind=pathological data.partition.classes_per_client=2",
            ["'data.partition.classes_per_client'", "'clients.num_clients'", "pathological"],
        ),
    ],
    ids=["iid", "dirichlet-min-size", "dirichlet-redraws", "pathological"],
)
def test_too_many_clients_for_the_partition(
    tmp_path: Path, keys: dict, overrides: str, needles: list
) -> None:
    fails(cfg_of(tmp_path, overrides, **keys), *needles)


def test_more_natural_clients_than_writers(tmp_path: Path) -> None:
    npz = write_writers_npz(tmp_path / "d" / "w.npz", writers=4)
    fails(femnist_cfg(tmp_path, npz, **{"num-clients": 5}), "'clients.num_clients'", "only 4 distinct")


def test_more_classes_per_client_than_the_data_has(tmp_path: Path) -> None:
    npz = write_writers_npz(tmp_path / "d" / "w.npz", labels=3)
    cfg = femnist_cfg(
        tmp_path,
        npz,
        "data.partition.kind=pathological data.partition.classes_per_client=5",
        **{"num-clients": 2},
    )
    fails(cfg, "'data.partition.classes_per_client'", "only 3 classes")


# --------------------------------------------------------------------------- classes and images


def test_labels_beyond_the_models_head(tmp_path: Path) -> None:
    fails(cfg_of(tmp_path, "data.num_classes=5"), "'data.num_classes'", "labels 0..9")


def test_a_class_count_that_differs_from_the_named_classes(tmp_path: Path) -> None:
    npz = write_writers_npz(tmp_path / "d" / "w.npz")
    fails(femnist_cfg(tmp_path, npz, "data.num_classes=70"), "'data.num_classes'", "62 classes", "70")


def test_images_with_channels_the_transform_cannot_serve(tmp_path: Path) -> None:
    npz = write_writers_npz(tmp_path / "d" / "w.npz", channels=2)
    fails(femnist_cfg(tmp_path, npz), "'data.in_chans'", "2-channel")


def _pretrained(tmp_path: Path, overrides: str) -> Path:
    from fedvit.models import build_model

    path = tmp_path / "pre.pt"
    torch.save({"model": build_model(cfg_of(tmp_path, overrides)).state_dict()}, path)
    return path


@pytest.mark.parametrize(
    ("trained", "needle"),
    [
        ("model.img_size=32", "'model.img_size'"),
        ("data.in_chans=3 data.mean=[0.5,0.5,0.5] data.std=[0.5,0.5,0.5]", "'data.in_chans'"),
    ],
)
def test_pretrained_weights_for_another_image_size_or_channels(
    tmp_path: Path, trained: str, needle: str
) -> None:
    path = _pretrained(tmp_path, trained)
    fails(cfg_of(tmp_path, f"model.pretrained={path}"), needle, "pre.pt")


def test_pretrained_weights_with_another_head_pass(tmp_path: Path) -> None:
    path = _pretrained(tmp_path, "data.num_classes=100 data.partition.classes_per_client=2")
    check(cfg_of(tmp_path, f"model.pretrained={path}"))  # a new head is the documented use


# --------------------------------------------------------------------------- good configs


def test_a_good_config_passes_and_leaves_the_partition_for_the_clients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedvit.data import cache_path, clear_all_caches, load_client_datasets, partition_fingerprint
    from fedvit.data import partition as partition_module

    cfg = cfg_of(tmp_path, **{"num-clients": 4})
    check(cfg, release=True)
    assert cache_path(cfg, partition_fingerprint(cfg)).is_file()
    clear_all_caches()

    def recompute(*args, **kwargs):
        raise AssertionError("the client recomputed the partition the preflight cached")

    monkeypatch.setattr(partition_module, "compute_partition", recompute)
    assert len(load_client_datasets(cfg, 3).train) > 0


def test_a_good_natural_partition_passes(tmp_path: Path) -> None:
    npz = write_writers_npz(tmp_path / "d" / "w.npz", writers=4)
    check(femnist_cfg(tmp_path, npz, **{"num-clients": 4}))


# --------------------------------------------------------------------------- where it runs


def test_the_server_checks_only_where_it_sees_the_clients_data() -> None:
    from fedvit.inprocess import InProcessGrid

    assert data_is_local(InProcessGrid({}, 2))
    assert not data_is_local(InProcessGrid({}, 2, node_configs=[{"data-path": "/dev/a.npz"}, {}]))
    assert not data_is_local(object())  # a deployment's grid: the data lives on the devices


def test_the_server_app_stops_before_asking_any_client(tmp_path: Path) -> None:
    from fedvit.inprocess import InProcessGrid
    from fedvit.server_app import run

    rc = {
        "num-clients": 1500,
        "partition": "iid",
        "output-dir": str(tmp_path / "out"),
        "overrides": f"data.cache_dir={tmp_path}",
    }
    grid = InProcessGrid(rc, 3)
    with pytest.raises(ConfigError, match=r"'clients\.num_clients'"):
        run(grid, load_config(rc))
    assert grid.sent == []
    assert not (tmp_path / "out").exists()


def test_the_runner_checks_local_runs_only(tmp_path: Path) -> None:
    from fedvit.runner import prepare_run_config

    rc = {"dataset": "organamnist", "data-dir": str(tmp_path / "nowhere")}
    with pytest.raises(ConfigError, match=r"'data\.data_dir'"):
        prepare_run_config(REPO, rc, cwd=tmp_path)
    # A remote SuperLink: the path is one on its machines, not checkable here.
    assert prepare_run_config(REPO, rc, cwd=tmp_path, local_paths=False).cfg is not None


def test_fedvit_partition_reports_a_corrupt_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedvit.cli import main

    npz = write_writers_npz(tmp_path / "d" / "w.npz", per_writer=300)
    _flip_middle(npz)
    rc = f"dataset=femnist data-dir='{npz.parent}' overrides='data.path=w.npz data.cache_dir={tmp_path}'"
    assert main(["partition", "-c", rc]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'data.path'" in err, err


# --------------------------------------------------------------------------- fedvit run


@pytest.mark.slow
@pytest.mark.parametrize(
    ("run_config", "needles"),
    [
        ("dataset=organamnist data-dir='/nowhere'", ["'data.data_dir'", "'data-dir'", "/nowhere"]),
        ("num-clients=5000", ["'clients.num_clients'", "'num-clients'", "5000 clients"]),
    ],
    ids=["data-dir", "num-clients"],
)
def test_fedvit_run_exits_2_at_once_and_starts_nothing(
    tmp_path: Path, mark: str, run_config: str, needles: list[str]
) -> None:
    cmd = [sys.executable, "-m", "fedvit.cli", "run", str(REPO), "-c", run_config]
    cmd += ["-c", f"output-dir='{tmp_path / 'out'}'"]
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    started: set[str] = set()
    while proc.poll() is None:  # everything the run starts inherits the mark
        started.update(describe_procs([p for p in marked(mark) if p.pid != proc.pid]))
        assert time.monotonic() - t0 < 300, "fedvit run did not fail fast"
        time.sleep(0.2)
    _, err = proc.communicate()
    wall = time.monotonic() - t0

    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("fedvit: error: key "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert started == set(), started
    assert marked(mark) == [], describe_procs(marked(mark))
    assert not (tmp_path / "out").exists()
    # 10 s on an idle machine; on a shared one the same work takes proportionally longer (before
    # the preflight existed these inputs ran 49 s and > 120 s, with Ray, on a machine with 2 cores).
    busy = max(1.0, max(load0, os.getloadavg()[0]) / (os.cpu_count() or 1))
    assert wall <= 10 * busy, (wall, busy)
