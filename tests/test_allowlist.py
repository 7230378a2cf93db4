"""What leaves a client (fedvit.boundary): every reply of every registered method carries only the
shared split, ``num-examples``, the client id, the identity facts and the method's declared
metrics; anything else is refused with an error naming the key and the method; label histograms
leave a client only when the run asks (and a device agrees)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import fedhelpers
import numpy as np
import pytest
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedvit.boundary import (
    COMMON,
    HISTOGRAMS,
    IDENTITY,
    QUERY,
    TRAIN,
    Allowlist,
    BoundaryError,
    check_reply,
)
from fedvit.config import load_config
from fedvit.models import build_model
from fedvit.params import ParameterSplit
from fedvit.registry import get_client
from fedvit.wire import VIRTUAL_WORKER, encode

ROOT = Path(__file__).resolve().parents[1]


def behaviour_check():
    """scripts/behaviour_check.py: the registered methods and their tiny federation's settings."""
    spec = importlib.util.spec_from_file_location("behaviour_check", ROOT / "scripts" / "behaviour_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHECK = behaviour_check()


def run_config(tmp_path: Path, method: str, extra: str = "", rounds: int = 1) -> dict:
    """One round of the behaviour check's tiny federation (3 clients on digits, a 2-block ViT)."""
    return fedhelpers.run_config(
        tmp_path, method, CHECK.TINY, rounds, f"{CHECK.EXTRA.get(method, '')} {extra}"
    )


def expected_metrics(kind: str, method_cfg, model) -> set[str]:
    """The spec of a ``kind`` reply's metric names for one client of this configuration."""
    client_cls = get_client(method_cfg.method.client)
    declared = set()
    for klass in client_cls.__mro__:  # each class declares its own additions
        declared |= set(vars(klass).get("REPLY_METRICS", {}).get(kind, ()))
    if kind == "evaluate" and hasattr(model, "exit_depths"):  # anytime: one accuracy per exit
        declared |= {f"{s}-acc-exit{d}" for d in model.exit_depths for s in ("test", "val")}
    return set(COMMON[kind]) | declared


@pytest.mark.parametrize("method", CHECK.methods())
def test_every_reply_of_every_method_carries_only_what_the_allowlist_names(
    tmp_path: Path, capture_replies, method: str
) -> None:
    rc = run_config(tmp_path, method)
    _, results, _ = fedhelpers.federate(rc)
    assert results["status"] == "completed"
    assert all(not r.get("train", {}).get("failures") for r in results["rounds"])  # nothing was refused
    cfg = load_config(rc)
    model = build_model(cfg)
    split = ParameterSplit.from_model(model, cfg.method.private)

    kinds = {kind for kind, _, _ in capture_replies}
    assert {"query", "train", "evaluate"} <= kinds, kinds
    for kind, cid, reply in capture_replies:
        content = reply.content
        metrics = dict(content["metrics"])
        assert not set(metrics) & set(HISTOGRAMS)  # off by default
        if kind == "query":
            assert set(content) == {"metrics"}
            described = set(metrics) - {VIRTUAL_WORKER, "clients"}
            assert described <= IDENTITY | expected_metrics("query", cfg, model), sorted(described)
            continue
        if kind == "train":
            assert set(content) == {"arrays", "metrics"}
            sent = set(content["arrays"])
            assert sent <= set(split.shared) and not sent & set(split.private)
        else:
            assert set(content) == {"metrics"}
        extra = set(metrics) - expected_metrics(kind, cfg, model)
        assert not extra, f"{method} {kind} reply of client {cid} carries {sorted(extra)}"
        assert all(isinstance(v, int | float) for v in metrics.values())
        assert metrics["client-id"] == cid


def test_apfl_no_longer_sends_its_mixing_weight(tmp_path: Path, train_replies) -> None:
    fedhelpers.federate(run_config(tmp_path, "apfl"))
    assert train_replies
    for _, reply in train_replies:
        assert not any("alpha" in k for k in reply.content["metrics"])


def test_a_reply_with_an_undeclared_metric_is_refused_naming_the_key_and_the_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clients.base import PartialClient

    original = PartialClient.fit

    def leaky_fit(self, parameters, config):
        params, n, metrics = original(self, parameters, config)
        return params, n, {**metrics, "label-mix": 0.7}

    monkeypatch.setattr(PartialClient, "fit", leaky_fit)
    rc = run_config(tmp_path, "fedper", rounds=1)
    with pytest.raises(RuntimeError) as err:  # no client's update is accepted: the round stops
        fedhelpers.federate(rc)
    assert "label-mix" in str(err.value) and "'fedper'" in str(err.value)


def allow(kind: str = TRAIN, **kw) -> Allowlist:
    return Allowlist(kind, "fedper", frozenset({"num-examples", "client-id", "train-loss"}), **kw)


def test_check_reply_refuses_extra_metrics_arrays_records_and_lists() -> None:
    arrays = ArrayRecord({"blocks.0.attn.qkv.weight": encode(np.zeros((6, 2), np.float32))})
    ok = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 4, "train-loss": 0.5})})
    check_reply(ok, allow(arrays=frozenset({"blocks.0.attn.qkv.weight"})))

    bad_metric = RecordDict({"metrics": MetricRecord({"num-examples": 4, "apfl-alpha": 0.3})})
    refused = r"method 'fedper': a train reply may not carry the metric 'apfl-alpha'"
    with pytest.raises(BoundaryError, match=refused):
        check_reply(bad_metric, allow())

    head = ArrayRecord({"head.weight": encode(np.zeros((2, 2), np.float32))})
    with pytest.raises(BoundaryError, match=r"may not carry the array 'head.weight'"):
        check_reply(RecordDict({"arrays": head}), allow(arrays=frozenset({"blocks.0.mlp.fc1.weight"})))

    with pytest.raises(BoundaryError, match=r"may not carry the record 'extra'"):
        check_reply(RecordDict({"extra": MetricRecord({"num-examples": 1})}), allow())

    smuggled = RecordDict({"metrics": MetricRecord({"train-loss": [0.1] * 1000})})
    with pytest.raises(BoundaryError, match=r"metric 'train-loss' must be a single number"):
        check_reply(smuggled, allow())

    hist = Allowlist(QUERY, "fedper", IDENTITY | set(HISTOGRAMS), list_lengths=dict.fromkeys(HISTOGRAMS, 3))
    check_reply(RecordDict({"metrics": MetricRecord({"client-id": 1, "train-hist": [1, 2, 3]})}), hist)
    with pytest.raises(BoundaryError, match=r"metric 'train-hist' must be a list of 3 numbers, got 4"):
        check_reply(RecordDict({"metrics": MetricRecord({"train-hist": [1, 2, 3, 4]})}), hist)


def test_label_histograms_reach_results_only_when_the_run_asks(tmp_path: Path) -> None:
    _, plain, _ = fedhelpers.federate(run_config(tmp_path / "plain", "fedavg"))
    assert plain["clients"]
    assert not any("train_hist" in c or "test_hist" in c for c in plain["clients"].values())

    asked_rc = run_config(tmp_path / "asked", "fedavg", "output.label_histograms=true")
    _, asked, _ = fedhelpers.federate(asked_rc)
    for c, info in asked["clients"].items():
        assert len(info["train_hist"]) == 10 and sum(info["train_hist"]) == info["num_train"], c
        assert sum(info["test_hist"]) == info["num_test"]


def test_a_device_sends_its_histograms_only_if_its_node_config_agrees(tmp_path: Path) -> None:
    from fedvit.inprocess import InProcessGrid
    from fedvit.server_app import run

    rc = run_config(tmp_path, "fedavg", "output.label_histograms=true")
    nodes = [{"client-id": 0, "label-histograms": "true"}, {"client-id": 1}, {"client-id": 2}]
    run_dir = run(InProcessGrid(rc, 3, node_configs=nodes), load_config(rc))
    clients = json.loads((run_dir / "results.json").read_text())["clients"]
    assert "train_hist" in clients["0"] and "test_hist" in clients["0"]
    assert not {"train_hist", "test_hist"} & (set(clients["1"]) | set(clients["2"]))
