"""Whole rounds in one process (the real ServerApp logic and ClientApp handlers, no Ray):
privacy of the split, persistence of private state, evaluation of personalized models
after aggregation, results, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fedhelpers
import numpy as np
import pytest
from fedhelpers import stored_private

from fedvit.config import load_config
from fedvit.inprocess import InProcessGrid
from fedvit.server_app import run

TINY = "model.depth=2 model.embed_dim=32 model.num_heads=2 train.batch_size=64"


def run_config(tmp_path: Path, method: str, rounds: int = 2, extra: str = "", **kw) -> dict:
    return fedhelpers.run_config(tmp_path, method, TINY, rounds, extra, **kw)


def federate(tmp_path: Path, method: str, rounds: int = 2, extra: str = "", **kw):
    return fedhelpers.federate(run_config(tmp_path, method, rounds, extra, **kw))


def test_fedper_sends_only_the_shared_split_and_keeps_the_head(tmp_path: Path, capture_replies) -> None:
    federate(tmp_path, "fedper")
    trains = [(cid, r) for kind, cid, r in capture_replies if kind == "train"]
    assert len(trains) == 6
    for cid, reply in trains:
        keys = set(reply.content["arrays"].keys())
        assert keys and not keys & {"head.weight", "head.bias", "norm.weight", "norm.bias"}
        private = stored_private(cid, "fedper")
        assert set(private) == {"head.weight", "head.bias", "norm.weight", "norm.bias"}
        sent = [v.numpy().tobytes() for v in reply.content["arrays"].values()]
        assert not any(p.tobytes() in sent for p in private.values())  # no private value under another name


def test_local_sends_nothing_and_clients_diverge(tmp_path: Path, capture_replies) -> None:
    _, results, _ = federate(tmp_path, "local")
    for kind, _, reply in capture_replies:
        if kind == "train":
            assert len(reply.content["arrays"]) == 0
    heads = [stored_private(c, "local")["head.weight"] for c in range(3)]
    assert not np.allclose(heads[0], heads[1])
    assert results["resources"]["params_sent_up_per_round"] == 0


def test_private_state_carries_over_between_rounds(tmp_path: Path, capture_replies) -> None:
    federate(tmp_path, "fedper", rounds=1)
    after_one = stored_private(0, "fedper")["head.weight"]
    from fedvit.models import build_model

    init = build_model(load_config(run_config(tmp_path, "fedper"))).state_dict()["head.weight"].numpy()
    assert not np.allclose(after_one, init)  # trained, not re-initialized


def test_reported_accuracy_is_the_personalized_model_after_aggregation(tmp_path: Path) -> None:
    _, results, run_dir = federate(tmp_path, "fedper")
    cfg = load_config(run_config(tmp_path, "fedper"))
    from fedvit.data import load_client_datasets
    from fedvit.models import build_model
    from fedvit.params import set_arrays
    from fedvit.training import evaluate, make_loader

    with np.load(run_dir / "checkpoint" / "arrays.npz") as z:
        shared = {k: z[k] for k in z.files}  # the aggregated shared parameters
    last = results["rounds"][-1]["eval"]["per_client"]
    for cid in range(3):
        model = build_model(cfg)
        set_arrays(model, shared)
        set_arrays(model, stored_private(cid, "fedper"))
        data = load_client_datasets(cfg, cid)
        res = evaluate(model, make_loader(data.test, 256, shuffle=False), __import__("torch").device("cpu"))
        assert res.accuracy == pytest.approx(last[str(cid)]["test-acc"])
        assert res.num_examples == last[str(cid)]["num-test"]


def test_results_hold_per_client_numbers_summaries_and_resources(tmp_path: Path) -> None:
    _, results, run_dir = federate(tmp_path, "fedavg", rounds=2)
    assert results["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for r in results["rounds"]:
        assert sorted(r["eval"]["per_client"], key=int) == ["0", "1", "2"]
        for key in ("mean", "weighted_mean", "std", "q10", "q50", "q90"):
            assert key in r["eval"]["test_acc"]
    assert set(results["clients"]) == {"0", "1", "2"}
    res = results["resources"]
    assert res["params_private_per_client"] == 0
    assert res["params_sent_up_per_round"] == res["params_stored_per_client"] == res["params_model"]
    assert res["flops_per_sample"] > 0
    assert results["summary"]["best_val_round"]["round"] in (1, 2)
    for name in ("config.yaml", "metrics.csv", "clients.csv"):
        assert (run_dir / name).is_file()


def test_fedavg_and_fedper_learn_on_digits(tmp_path: Path) -> None:
    """A sanity bar, not a benchmark: after a few rounds the personalized models beat chance."""
    _, results, _ = federate(tmp_path, "fedper", rounds=4, extra="train.local_epochs=2")
    assert results["summary"]["last_round"]["test_acc"]["mean"] > 0.3


def test_resume_continues_after_the_last_checkpoint(tmp_path: Path) -> None:
    _, first, run_dir = federate(tmp_path, "fedper", rounds=2)
    rc = run_config(tmp_path, "fedper", rounds=3, resume=str(run_dir))
    run(InProcessGrid(rc, 3), load_config(rc))
    resumed = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert resumed["rounds"][:2] == first["rounds"][:2]
    assert resumed["resumed_at_round"] == 2
    assert resumed["run_key"] == first["run_key"]  # clients find their private state again


def test_a_run_name_is_never_overwritten(tmp_path: Path) -> None:
    federate(tmp_path, "fedavg", rounds=1)
    with pytest.raises(FileExistsError, match="already holds a run"):
        federate(tmp_path, "fedavg", rounds=1)


def test_a_federation_wide_state_dir_gives_each_client_its_own_directory(tmp_path: Path) -> None:
    federate(tmp_path, "fedper", rounds=1, extra=f"clients.state_dir={tmp_path / 'st'}")
    files = sorted(p.relative_to(tmp_path / "st").as_posix() for p in (tmp_path / "st").rglob("private.npz"))
    assert files == [f"client-{c}/fedper-vit-tiny-digits/private.npz" for c in range(3)]


def test_a_device_state_dir_from_node_config_is_kept_across_runs(tmp_path: Path) -> None:
    rc = run_config(tmp_path, "fedper", rounds=1)
    nodes = [{"state-dir": str(tmp_path / f"device-{i}")} for i in range(3)]
    run(InProcessGrid(rc, 3, node_configs=nodes), load_config(rc))
    path = tmp_path / "device-1" / "fedper-vit-tiny-digits" / "private.npz"
    before = np.load(path)["head.weight"]
    rc2 = {**rc, "run-name": "second-run"}
    run(InProcessGrid(rc2, 3, node_configs=nodes), load_config(rc2))
    after = np.load(path)["head.weight"]
    # Training is deterministic: a second run that started fresh would end exactly where the
    # first one did. It ends elsewhere because it continued from the saved head.
    assert not np.allclose(before, after)


def test_a_new_run_with_a_reused_name_does_not_inherit_private_state(tmp_path: Path) -> None:
    _, first, _ = federate(tmp_path / "a", "local", rounds=1)
    _, second, _ = federate(tmp_path / "b", "local", rounds=1)  # same run name, other output dir
    assert first["run_key"] != second["run_key"]
    # same seed, same data, fresh state: the second run repeats the first one exactly
    assert first["rounds"][0]["eval"]["per_client"] == second["rounds"][0]["eval"]["per_client"]


def test_a_simulated_runs_client_state_lives_in_its_run_directory(tmp_path: Path) -> None:
    _, _, run_dir = federate(tmp_path, "fedper", rounds=1)
    files = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("private.npz"))
    assert files == [f"clients/client-{c}/private.npz" for c in range(3)]
    assert not list(Path(os.environ["FEDVIT_STATE_DIR"]).rglob("private.npz"))  # nothing left elsewhere


def test_a_device_without_a_state_dir_keeps_its_state_outside_the_run_directory(tmp_path: Path) -> None:
    rc = run_config(tmp_path, "fedper", rounds=1)
    nodes = [{"client-id": i} for i in range(3)]  # devices: identity from their node config
    run_dir = run(InProcessGrid(rc, 3, node_configs=nodes), load_config(rc))
    assert not list(run_dir.rglob("private.npz"))
    assert len(list(Path(os.environ["FEDVIT_STATE_DIR"]).rglob("private.npz"))) == 3
