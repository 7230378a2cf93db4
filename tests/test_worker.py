"""What a worker process reuses between messages (fedvit.worker, fedvit.client_app): models come
back pristine, caches are keyed by everything that shapes them, private state is never cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fedhelpers
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from torch import nn

from fedvit import client_app, worker
from fedvit.inprocess import InProcessGrid

TINY = "model.depth=1 model.embed_dim=16 model.num_heads=2 train.batch_size=64"


@pytest.fixture(autouse=True)
def _cold_worker() -> None:
    worker.clear()


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def test_a_pooled_model_comes_back_exactly_as_built() -> None:
    pool = worker.ModelPool(_tiny_model)
    model = pool.acquire()
    built = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[2].weight.requires_grad_(False)
    model.eval()
    model[1].eps = 0.5
    model[2].max_depth = 3  # an attribute a client added
    pool.release(model)

    again = pool.acquire()
    assert again is model and pool.builds == 1  # reused, not rebuilt
    assert all(torch.equal(again.state_dict()[k], v) for k, v in built.items())
    assert again[0].weight.grad is None
    assert all(p.requires_grad for p in again.parameters())
    assert again.training and again[1].eps == 1e-5
    assert not hasattr(again[2], "max_depth")


def test_a_model_whose_modules_were_replaced_is_rebuilt() -> None:
    pool = worker.ModelPool(_tiny_model)
    model = pool.acquire()
    model[2] = nn.Linear(4, 2)
    pool.release(model)
    again = pool.acquire()
    assert again is not model and pool.builds == 2


def test_a_model_in_use_is_never_handed_out_twice() -> None:
    pool = worker.ModelPool(_tiny_model)
    first, second = pool.acquire(), pool.acquire()
    assert first is not second and pool.builds == 2


def _context(rc: dict, node: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=rc)


def _message(cid: int, run_name: str = "run") -> Message:
    InProcessGrid({}, 0)  # messages made in this process need a ServerApp's identity
    config = ConfigRecord({"client-id": cid, "run-name": run_name, "run-key": f"{run_name}-k"})
    return Message(RecordDict({"config": config}), dst_node_id=7, message_type=MessageType.EVALUATE)


def _rc(tmp_path: Path, extra: str = "") -> dict:
    return fedhelpers.run_config(tmp_path, "fedper", TINY, extra=extra)


def test_same_configuration_reuses_model_and_data_and_another_client_gets_its_own(tmp_path: Path) -> None:
    rc = _rc(tmp_path)
    with client_app.client_setup(_message(0), _context(rc, {"partition-id": 0})) as a:
        model_a, data_a = a.model, a.data
    with client_app.client_setup(_message(0), _context(rc, {"partition-id": 0})) as b:
        assert b.model is model_a and b.data is data_a
    with client_app.client_setup(_message(1), _context(rc, {"partition-id": 1})) as c:
        assert c.model is model_a  # the same pristine skeleton ...
        assert c.data is not data_a and c.data.client_id == 1  # ... but the client's own data
        assert not np.array_equal(c.data.train.indices, data_a.train.indices)


def test_a_changed_configuration_never_sees_another_configurations_objects(tmp_path: Path) -> None:
    with client_app.client_setup(_message(0), _context(_rc(tmp_path), {"partition-id": 0})) as a:
        model_a, data_a = a.model, a.data
    other = _rc(tmp_path, extra="model.embed_dim=32")
    with client_app.client_setup(_message(0), _context(other, {"partition-id": 0})) as b:
        assert b.model is not model_a and b.data is not data_a
        assert b.model.state_dict()["pos_embed"].shape[-1] == 32


def test_a_rewritten_data_file_is_reloaded(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * 16).clip(0, 255).astype(np.uint8)[..., None]
    path = tmp_path / "d.npz"

    def write(n: int) -> None:
        np.savez(
            path,
            train_images=images[:n],
            train_labels=digits.target[:n],
            test_images=images[1000:1200],
            test_labels=digits.target[1000:1200],
        )

    write(600)
    extra = f"data.source=medmnist-npz data.path={path} data.num_classes=10 data.in_chans=1"
    rc = _rc(tmp_path, extra=extra)
    with client_app.client_setup(_message(0), _context(rc, {"partition-id": 0})) as a:
        before = len(a.data.train) + len(a.data.val)
    write(900)
    with client_app.client_setup(_message(0), _context(rc, {"partition-id": 0})) as b:
        after = len(b.data.train) + len(b.data.val)
    assert after > before


def test_a_restarted_worker_still_has_the_clients_private_state(tmp_path: Path) -> None:
    _, _, run_dir = fedhelpers.federate(_rc(tmp_path))
    saved = fedhelpers.stored_private(0, "fedper")
    worker.clear()  # a new worker process: nothing cached
    rc = {**_rc(tmp_path), "resume": str(run_dir)}
    config = dict(_message(0, "fedper").content["config"])
    with client_app.client_for(config, _context(rc, {"partition-id": 0})) as client:
        head = client.model.state_dict()["head.weight"].numpy()
    np.testing.assert_array_equal(head, saved["head.weight"])


def test_a_traced_message_records_its_wall_and_cpu_time_only_when_asked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(worker.TRACE_ENV, raising=False)
    with worker.traced("train", 3, 2):
        pass
    assert not list(tmp_path.iterdir())  # off by default: nothing written anywhere

    monkeypatch.setenv(worker.TRACE_ENV, str(tmp_path))
    with worker.traced("train", 3, 2):
        sum(i * i for i in range(200_000))  # some CPU
    (path,) = tmp_path.iterdir()
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert path.name == f"{os.getpid()}.jsonl"
    assert record["kind"] == "train" and record["client"] == 3 and record["round"] == 2
    assert record["t1"] >= record["t0"] and 0 < record["cpu_s"] <= record["t1"] - record["t0"] + 0.05


def test_ray_workers_are_warmed_by_a_setup_hook_that_imports_the_client_app() -> None:
    from fedvit import warmup

    env = warmup.ray_runtime_env({"env_vars": {"PYTHONPATH": "/x"}})
    assert env == {"env_vars": {"PYTHONPATH": "/x"}, "worker_process_setup_hook": warmup.SETUP_HOOK}
    assert warmup.ray_runtime_env(None) == {"worker_process_setup_hook": warmup.SETUP_HOOK}
    mine = {"worker_process_setup_hook": "my.hook"}
    assert warmup.ray_runtime_env(mine) == mine  # a hook the user set wins
    code = (
        "import sys; from fedvit import warmup; assert 'fedvit.client_app' not in sys.modules; "
        "warmup.warm_up(); assert 'fedvit.client_app' in sys.modules and 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
