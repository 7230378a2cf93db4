"""Sampled evaluation (``server.eval_fraction``): by default every client is evaluated in every
evaluated round; a sampled protocol asks a seeded fraction of the clients, every client in the
last round and the listed ``server.eval_full_rounds``, and says which rounds were sampled in
results.json, metrics.csv, the plots and the progress line."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import fedhelpers
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedvit.config import ConfigError, load_config
from fedvit.inprocess import InProcessGrid
from fedvit.plots import plot_run, sampled_label
from fedvit.results import RunRecorder
from strategies.base import PersonalizedStrategy

N = 12
TINY = "model.depth=1 model.embed_dim=16 model.num_heads=2 train.batch_size=64 train.local_steps=1"


def fake_client(msg: Message, context: Context) -> Message:
    """Answers an evaluate message with made-up metrics (accuracy = client id / 100)."""
    cid = int(context.node_config["partition-id"])
    metrics = {"client-id": cid, "test-acc": cid / 100, "num-test": 10, "val-acc": cid / 100, "num-val": 5}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def make(num_rounds: int = 10, **kw) -> tuple[PersonalizedStrategy, InProcessGrid]:
    """A strategy that knows N clients (client i on node 1001 + 7 i) and the grid they are on."""
    grid = InProcessGrid({}, N, client_app=fake_client)
    strategy = PersonalizedStrategy(shared_shapes={"w": (2,)}, num_clients=N, **kw)
    strategy.node_to_client = {node: i for i, node in enumerate(sorted(grid.contexts))}
    strategy.num_rounds = num_rounds
    return strategy, grid


def asked(strategy: PersonalizedStrategy, grid: InProcessGrid, rnd: int) -> list[int]:
    """Client ids of the evaluate messages the strategy configures for round ``rnd``."""
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    messages, _ = strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid)
    assert all(m.metadata.message_type == "evaluate" for m in messages)
    return [strategy.node_to_client[m.metadata.dst_node_id] for m in messages]


# ---------------------------------------------------------------------- which clients are asked


def test_by_default_every_client_is_asked_in_every_evaluated_round() -> None:
    strategy, grid = make(num_rounds=5, eval_every=2)
    assert {r: asked(strategy, grid, r) for r in range(1, 6)} == {
        1: [],
        2: list(range(N)),
        3: [],
        4: list(range(N)),
        5: list(range(N)),
    }


def test_a_sampled_round_asks_round_fraction_times_n_distinct_clients() -> None:
    strategy, grid = make(num_rounds=10, eval_fraction=0.25)
    for rnd in range(1, 10):
        ids = asked(strategy, grid, rnd)
        assert len(ids) == round(0.25 * N) == 3
        assert len(set(ids)) == 3 and set(ids) <= set(range(N))


def test_the_sample_is_seeded_reproducible_and_changes_with_round_and_seed() -> None:
    def samples(seed: int) -> list[list[int]]:
        strategy, grid = make(num_rounds=10, eval_fraction=0.25, seed=seed)
        return [asked(strategy, grid, r) for r in range(1, 10)]

    first = samples(0)
    assert samples(0) == first  # a fresh strategy with the same seed asks the same clients
    assert len({tuple(s) for s in first}) > 1  # not the same clients every round
    assert samples(1) != first


def test_the_evaluation_sample_is_independent_of_the_training_sample() -> None:
    strategy, grid = make(num_rounds=10, eval_fraction=0.25, fraction_train=0.25)
    train = [[strategy.node_to_client[n] for n in strategy.sample_nodes(r, grid)] for r in range(1, 10)]
    evaluated = [asked(strategy, grid, r) for r in range(1, 10)]
    assert [len(t) for t in train] == [len(e) for e in evaluated]
    assert train != evaluated


def test_the_last_round_and_the_listed_full_rounds_ask_every_client() -> None:
    strategy, grid = make(num_rounds=7, eval_every=3, eval_fraction=0.25, eval_full_rounds=[2, 4])
    counts = {r: len(asked(strategy, grid, r)) for r in range(1, 8)}
    # 2 and 4 are listed (2 is off the eval_every cadence, still evaluated), 7 is the last
    assert counts == {1: 0, 2: N, 3: 3, 4: N, 5: 0, 6: 3, 7: N}


def test_eval_min_clients_is_a_floor_on_the_sample() -> None:
    strategy, grid = make(eval_fraction=0.05)
    assert len(asked(strategy, grid, 1)) == 1  # round(0.6)
    strategy, grid = make(eval_fraction=0.05, eval_min_clients=4)
    assert len(asked(strategy, grid, 1)) == 4


def test_only_live_clients_are_sampled_and_counted() -> None:
    strategy, grid = make(num_rounds=3, eval_fraction=0.25)
    grid.offline = set(sorted(grid.contexts)[:4])  # clients 0-3 are gone
    sampled = asked(strategy, grid, 1)
    assert len(sampled) == 2 and min(sampled) >= 4  # round(0.25 * 8)
    assert asked(strategy, grid, 3) == list(range(4, N))
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    plans = {r: strategy.configure_evaluate(r, arrays, ConfigRecord(), grid)[1] for r in (1, 3)}
    assert [(p.sampled, len(p.sent), p.live) for p in plans.values()] == [(True, 2, 8), (False, 8, 8)]


# ---------------------------------------------------------------------- what is recorded


def test_aggregate_evaluate_records_the_round_as_sampled_with_k_of_n(tmp_path: Path) -> None:
    strategy, grid = make(num_rounds=3, eval_fraction=0.25)
    strategy.recorder = RunRecorder(tmp_path, {}, plots=False)
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    messages, plan = strategy.configure_evaluate(1, arrays, ConfigRecord(), grid)
    ids = [strategy.node_to_client[m.metadata.dst_node_id] for m in messages]
    metrics = strategy.aggregate_evaluate(plan, strategy.exchange(grid, messages, timeout=10))
    ev = strategy.recorder.data["rounds"][-1]["eval"]
    counts = (ev["clients_evaluated"], ev["clients_asked"], ev["clients_total"])
    assert ev["mode"] == "sampled" and counts == (3, 3, N)
    assert sorted(ev["per_client"], key=int) == [str(c) for c in ids]
    # statistics over the sampled clients only
    assert ev["test_acc"]["n"] == 3 and ev["test_acc"]["mean"] == pytest.approx(np.mean(ids) / 100)
    assert (metrics["sampled"], metrics["num-clients"], metrics["num-clients-total"]) == (1, 3, N)
    assert strategy.recorder.data["evaluation"]["mode"] == "sampled"
    assert strategy.recorder.data["evaluation"]["fraction"] == 0.25


def test_the_progress_line_says_sampled_k_of_n(caplog: pytest.LogCaptureFixture) -> None:
    strategy, _ = make(num_rounds=3)
    ev = {"test-acc-mean": 0.5, "test-acc-std": 0.1, "test-acc-weighted": 0.5, "val-acc-mean": 0.4}
    with caplog.at_level(logging.INFO, logger="flwr"):
        for rnd, k, sampled in ((1, 3, 1), (3, N, 0)):
            counts = {"num-clients": k, "num-clients-total": N, "sampled": sampled}
            strategy._progress(rnd, None, MetricRecord({**ev, **counts}), 1.0)
    lines = [r.getMessage() for r in caplog.records if "[fedvit] round" in r.getMessage()]
    assert len(lines) == 2
    assert "(sampled 3/12)" in lines[0]
    assert "sampled" not in lines[1]


def record(rec: RunRecorder, rnd: int, val: dict[int, float], total: int, sampled: bool) -> None:
    per_client = {c: {"test-acc": v, "num-test": 10, "val-acc": v, "num-val": 5} for c, v in val.items()}
    rec.record_eval(rnd, per_client, [], sampled=sampled, clients_asked=len(val), clients_total=total)
    rec.end_round(rnd)


def test_best_val_round_is_chosen_among_full_rounds_only(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path, {"method": "m", "dataset": "d", "run_name": "r"}, plots=False)
    record(rec, 1, {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5}, 4, sampled=False)
    record(rec, 2, {1: 0.99}, 4, sampled=True)  # the highest validation mean, but one client only
    record(rec, 3, {0: 0.6, 1: 0.6, 2: 0.6, 3: 0.6}, 4, sampled=False)
    record(rec, 4, {2: 0.95}, 4, sampled=True)  # a run still going: the latest round is sampled
    summary = rec.data["summary"]
    assert summary["best_val_round"]["round"] == 3
    assert summary["last_round"]["round"] == 3  # the latest full evaluation, not round 4
    assert (summary["full_eval_rounds"], summary["sampled_eval_rounds"]) == (2, 2)
    assert "sampled rounds are not candidates" in summary["selection"]
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    columns = ("round", "eval_mode", "num_eval_clients", "num_eval_clients_total")
    assert [tuple(r[c] for c in columns) for r in rows] == [
        ("1", "full", "4", "4"),
        ("2", "sampled", "1", "4"),
        ("3", "full", "4", "4"),
        ("4", "sampled", "1", "4"),
    ]


def test_no_round_is_picked_before_a_full_evaluation(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path, {}, plots=False)
    record(rec, 1, {1: 0.9}, 4, sampled=True)
    assert "best_val_round" not in rec.data["summary"] and "last_round" not in rec.data["summary"]
    assert rec.data["summary"]["sampled_eval_rounds"] == 1


def test_plots_label_the_sampled_rounds(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path, {"method": "m", "dataset": "d", "run_name": "r"}, plots=False)
    record(rec, 1, {0: 0.3, 1: 0.4}, 8, sampled=True)
    record(rec, 2, {c: 0.1 * c for c in range(8)}, 8, sampled=False)
    record(rec, 3, {4: 0.5, 5: 0.6, 6: 0.4}, 8, sampled=True)
    assert sampled_label(rec.data["rounds"]) == "sampled (2–3 of 8 clients)"
    assert sampled_label(rec.data["rounds"][1:2]) is None
    paths = plot_run(rec.data, tmp_path)
    assert [p.name for p in paths] == ["accuracy.png", "clients.png"]
    assert all(p.stat().st_size > 0 for p in paths)


# ---------------------------------------------------------------------- config


def test_defaults_are_every_client_every_evaluated_round() -> None:
    s = load_config({}).server
    assert (s.eval_fraction, s.eval_min_clients, s.eval_full_rounds) == (1.0, 1, [])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("server.eval_fraction=0", "server.eval_fraction"),
        ("server.eval_fraction=1.5", "server.eval_fraction"),
        ("server.eval_fraction=-0.1", "server.eval_fraction"),
        ("server.eval_min_clients=0", "server.eval_min_clients"),
        ("server.eval_min_clients=99", "server.eval_min_clients"),
        ("server.eval_full_rounds=[0,5]", "server.eval_full_rounds"),
        ("server.eval_full_rounds=[-3]", "server.eval_full_rounds"),
        ("server.eval_full_rounds=[abc]", "server.eval_full_rounds"),
        ("server.eval_full_rounds=5", "server.eval_full_rounds"),
    ],
)
def test_bad_values_raise_a_config_error_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"key '{key}"):
        load_config({"overrides": override})


# ---------------------------------------------------------------------- whole federations


def federate(tmp_path: Path, clients: int, rounds: int, extra: str) -> tuple[dict, Path]:
    rc = fedhelpers.run_config(tmp_path, "fedper", TINY, rounds, extra)
    rc["num-clients"] = clients
    _, results, run_dir = fedhelpers.federate(rc)
    return results, run_dir


def test_default_federation_evaluates_every_client_in_every_evaluated_round(tmp_path: Path, received) -> None:
    results, _ = federate(tmp_path, clients=4, rounds=3, extra="server.eval_every=2")
    evaluated = {r["round"]: r["eval"] for r in results["rounds"] if "eval" in r}
    assert sorted(evaluated) == [2, 3]
    for ev in evaluated.values():
        assert (ev["mode"], ev["clients_evaluated"], ev["clients_total"]) == ("full", 4, 4)
        assert sorted(ev["per_client"], key=int) == ["0", "1", "2", "3"]
    assert sum(kind == "evaluate" for kind, _, _ in received) == 8
    assert results["evaluation"]["mode"] == "full"
    assert results["summary"]["sampled_eval_rounds"] == 0


def test_sampled_federation_marks_each_round(
    tmp_path: Path, received, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="flwr"):
        results, run_dir = federate(
            tmp_path,
            clients=8,
            rounds=4,
            extra="server.eval_fraction=0.25 server.eval_full_rounds=[2] output.plots=true",
        )
    rounds = {r["round"]: r["eval"] for r in results["rounds"]}
    modes = {r: (ev["mode"], ev["clients_evaluated"], ev["clients_total"]) for r, ev in rounds.items()}
    assert modes == {1: ("sampled", 2, 8), 2: ("full", 8, 8), 3: ("sampled", 2, 8), 4: ("full", 8, 8)}
    # the evaluate messages went to exactly the clients the results report, round by round
    asked = sorted((r, int(c)) for r in (1, 2, 3, 4) for c in rounds[r]["per_client"])
    assert sorted(received.evaluations) == asked
    assert rounds[1]["test_acc"]["n"] == 2
    assert results["summary"]["best_val_round"]["round"] in (2, 4)
    assert results["summary"]["last_round"]["round"] == 4
    protocol = results["evaluation"]
    assert (protocol["mode"], protocol["fraction"], protocol["full_rounds"]) == ("sampled", 0.25, [2])
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [r["eval_mode"] for r in rows] == ["sampled", "full", "sampled", "full"]
    progress = [r.getMessage() for r in caplog.records if "[fedvit] round" in r.getMessage()]
    assert ["(sampled 2/8)" in line for line in progress] == [True, False, True, False]
    assert (run_dir / "accuracy.png").is_file() and (run_dir / "clients.png").is_file()
