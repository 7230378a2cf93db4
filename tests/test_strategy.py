"""The base personalized strategy: identity, per-client messages, aggregation of the shared
split only, rejection of bad updates, evaluation of every client, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedvit.inprocess import InProcessGrid
from fedvit.results import RunRecorder
from fedvit.wire import EVAL_ARRAYS, EVAL_CONFIG, EVAL_METRICS
from strategies.base import (
    ClientUpdate,
    Payload,
    PersonalizedStrategy,
    RoundPlan,
    Sent,
    to_record,
    weighted_mean,
)

SHAPES = {"w": (2,), "b": (1,)}


def numpy_client(behaviour: dict[int, str] | None = None, seen: dict | None = None):
    """A numpy-only ClientApp: client i adds (i + 1) to every shared array and reports
    num-examples = 10 * (i + 1); ``behaviour[i]`` makes it misbehave."""
    behaviour = behaviour or {}

    def app(msg: Message, ctx: Context) -> Message:
        cid = int(ctx.node_config["partition-id"])
        kind = msg.metadata.message_type
        if kind == "query":
            return Message(
                RecordDict({"metrics": MetricRecord({"client-id": cid, "num-train": 10 * (cid + 1)})}),
                reply_to=msg,
            )
        arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        pipelined = kind == "train" and EVAL_CONFIG in msg.content.config_records
        if seen is not None:
            if pipelined:  # the evaluation it carries comes first
                record = msg.content.array_records.get(EVAL_ARRAYS, msg.content["arrays"])
                seen.setdefault("evaluate", []).append(
                    (cid, {k: v.numpy().copy() for k, v in record.items()})
                )
            seen.setdefault(kind, []).append((cid, {k: v.copy() for k, v in arrays.items()}))
        evaluation = MetricRecord(
            {
                "client-id": cid,
                "test-acc": 0.1 * (cid + 1),
                "test-loss": 1.0,
                "num-test": 5 * (cid + 1),
                "val-acc": 0.5,
                "val-loss": 1.0,
                "num-val": 2,
                "num-examples": 5 * (cid + 1),
            }
        )
        if kind == "evaluate":
            return Message(RecordDict({"metrics": evaluation}), reply_to=msg)
        mode = behaviour.get(cid)
        if mode == "raise":
            raise RuntimeError("disk full")
        out = {k: v + (cid + 1) for k, v in arrays.items()}
        if mode == "nan":
            out["w"] = np.array([np.nan, 0.0], np.float32)
        if mode == "extra-key":
            out["head.weight"] = np.zeros(3, np.float32)
        if mode == "wrong-shape":
            out["w"] = np.zeros(3, np.float32)
        metrics = MetricRecord({"client-id": cid, "num-examples": 10 * (cid + 1), "train-loss": 0.5})
        record = ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in out.items()})
        content = RecordDict({"arrays": record, "metrics": metrics})
        if pipelined:
            content[EVAL_METRICS] = evaluation
        return Message(content, reply_to=msg)

    return app


def make_strategy(tmp_path: Path, **kwargs) -> PersonalizedStrategy:
    recorder = RunRecorder(tmp_path / "run", {"run_name": "t", "method": "x", "dataset": "y"}, plots=False)
    kw = {
        "shared_shapes": SHAPES,
        "num_clients": 3,
        "recorder": recorder,
        "checkpoint_dir": tmp_path / "run" / "checkpoint",
        "run_name": "t",
    }
    kw.update(kwargs)
    return PersonalizedStrategy(**kw)


def initial() -> ArrayRecord:
    return to_record({"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)})


def test_weighted_mean_weights_by_examples() -> None:
    ups = [
        ClientUpdate(0, 1, {"w": np.array([1.0, 2.0])}, 1),
        ClientUpdate(1, 2, {"w": np.array([5.0, 6.0])}, 3),
    ]
    np.testing.assert_allclose(weighted_mean(ups, ["w"])["w"], [4.0, 5.0])


def test_a_round_averages_shared_arrays_by_examples(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    grid = InProcessGrid({}, 3, client_app=numpy_client())
    result = strategy.start(grid, initial(), num_rounds=1)
    # client i sends 0 + (i+1) with weight 10 (i+1): sum (i+1)^2 / sum (i+1) = 14 / 6
    np.testing.assert_allclose(result.arrays["w"].numpy(), [14 / 6] * 2, rtol=1e-6)
    assert sorted(strategy.node_to_client.values()) == [0, 1, 2]
    assert all(node != cid for node, cid in strategy.node_to_client.items())


@pytest.mark.parametrize("mode", ["nan", "extra-key", "wrong-shape", "raise"])
def test_a_bad_update_is_rejected_logged_and_not_aggregated(tmp_path: Path, mode: str) -> None:
    strategy = make_strategy(tmp_path)
    grid = InProcessGrid({}, 3, client_app=numpy_client({2: mode}))
    result = strategy.start(grid, initial(), num_rounds=1)
    # only clients 0 and 1: (1*10 + 2*20) / 30
    np.testing.assert_allclose(result.arrays["w"].numpy(), [50 / 30] * 2, rtol=1e-6)
    train = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"][0]["train"]
    assert train["clients"] == [0, 1]
    problems = train["rejected"].get("2", "") + " ".join(train["failures"])
    assert {"nan": "NaN", "extra-key": "unknown", "wrong-shape": "shape", "raise": "disk full"}[
        mode
    ] in problems


def test_per_client_messages_reach_the_right_client(tmp_path: Path) -> None:
    class PerClient(PersonalizedStrategy):
        def train_arrays(self, server_round, client_id, arrays):
            return Payload(to_record({k: v.numpy() + 100 * client_id for k, v in arrays.items()}))

    seen: dict = {}
    strategy = make_strategy(tmp_path)
    strategy.__class__ = PerClient
    strategy.start(InProcessGrid({}, 3, client_app=numpy_client(seen=seen)), initial(), num_rounds=1)
    for cid, arrays in seen["train"]:
        np.testing.assert_allclose(arrays["w"], [100 * cid] * 2)


def test_every_client_is_evaluated_and_summarized(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path, fraction_train=0.34)
    seen: dict = {}
    strategy.start(InProcessGrid({}, 3, client_app=numpy_client(seen=seen)), initial(), num_rounds=2)
    assert all(len([c for c, _ in seen["train"]]) == 2 for _ in [0])  # 1 client per round x 2 rounds
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    for r in data["rounds"]:
        assert len(r["train"]["clients"]) == 1
        ev = r["eval"]
        assert sorted(ev["per_client"], key=int) == ["0", "1", "2"]
        assert ev["test_acc"]["mean"] == pytest.approx(0.2)
        assert ev["test_acc"]["weighted_mean"] == pytest.approx((0.1 * 5 + 0.2 * 10 + 0.3 * 15) / 30)
        assert ev["test_acc"]["q50"] == pytest.approx(0.2)


def test_eval_every_skips_rounds_but_always_evaluates_the_last(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path, eval_every=2)
    strategy.start(InProcessGrid({}, 3, client_app=numpy_client()), initial(), num_rounds=3)
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [("eval" in r) for r in data["rounds"]] == [False, True, True]


def test_checkpoint_restores_round_and_arrays(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    result = strategy.start(InProcessGrid({}, 3, client_app=numpy_client()), initial(), num_rounds=2)
    fresh = make_strategy(tmp_path)
    last, arrays = fresh.load_checkpoint(tmp_path / "run" / "checkpoint")
    assert last == 2
    np.testing.assert_array_equal(arrays["w"].numpy(), result.arrays["w"].numpy())


def test_sampling_is_seeded(tmp_path: Path) -> None:
    a = make_strategy(tmp_path, fraction_train=0.5, seed=1)
    b = make_strategy(tmp_path, fraction_train=0.5, seed=1)
    grid = InProcessGrid({}, 3, client_app=numpy_client())
    a.discover(grid, 5)
    b.discover(grid, 5)
    assert [a.sample_nodes(r, grid) for r in range(1, 6)] == [b.sample_nodes(r, grid) for r in range(1, 6)]


def test_a_round_where_every_client_fails_stops_the_run_with_the_reason(tmp_path: Path) -> None:
    from strategies.base import RoundFailedError

    strategy = make_strategy(tmp_path)
    grid = InProcessGrid({}, 3, client_app=numpy_client({0: "raise", 1: "nan", 2: "raise"}))
    with pytest.raises(RoundFailedError, match="disk full"):
        strategy.start(grid, initial(), num_rounds=1)


def test_clients_that_cannot_start_are_reported(tmp_path: Path) -> None:
    from strategies.base import RoundFailedError

    def broken(msg, ctx):
        raise FileNotFoundError("data.path: no such file: /nope.npz")

    with pytest.raises(RoundFailedError, match=r"nope\.npz"):
        make_strategy(tmp_path).start(InProcessGrid({}, 3, client_app=broken), initial(), num_rounds=1)


class LostNodeGrid(InProcessGrid):
    """Numbers messages like the SuperLink does. Client ``lost`` stops answering train messages
    after discovery: with ``superlink_error`` the SuperLink answers for it from node 0, as Flower
    does once a hard-killed SuperNode misses its heartbeats; without, nothing comes back."""

    def __init__(self, lost: int, superlink_error: bool) -> None:
        super().__init__({}, 3, client_app=numpy_client())
        self.lost, self.superlink_error = lost, superlink_error

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}-{i}"
            cid = self.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
            if msg.metadata.message_type != "train" or cid != self.lost:
                replies.append(self._handle(msg))
            elif self.superlink_error:
                err = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=msg)
                err.metadata.__dict__["_src_node_id"] = 0
                replies.append(err)
        return replies


@pytest.mark.parametrize("superlink_error", [True, False])
def test_a_lost_node_is_named_in_the_round_failures_and_the_round_goes_on(
    tmp_path: Path, superlink_error: bool
) -> None:
    grid = LostNodeGrid(lost=1, superlink_error=superlink_error)
    result = make_strategy(tmp_path).start(grid, initial(), num_rounds=1, timeout=7)
    # clients 0 and 2 only: (1*10 + 3*30) / 40
    np.testing.assert_allclose(result.arrays["w"].numpy(), [100 / 40] * 2, rtol=1e-6)
    (failure,) = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"][0]["train"]["failures"]
    assert failure.startswith("client 1 (node 1008):")
    assert ("Node Unavailable" if superlink_error else "no reply within 7s") in failure


# ---------------------------------------------------------------------- the round as a value


def test_configure_train_returns_the_messages_and_a_plan_of_what_each_client_was_sent(tmp_path: Path) -> None:
    class PerClient(PersonalizedStrategy):
        def train_arrays(self, server_round, client_id, arrays):
            extra = to_record({"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32), "x": np.ones(3)})
            return Payload(extra if client_id == 1 else arrays, {"asked": client_id})

    strategy = make_strategy(tmp_path, fraction_train=0.67, seed=3)
    strategy.__class__ = PerClient
    grid = InProcessGrid({}, 3, client_app=numpy_client())
    strategy.discover(grid, 5)
    messages, plan = strategy.configure_train(4, initial(), ConfigRecord(), grid)
    assert (plan.kind, plan.server_round, plan.live, plan.sampled) == ("train", 4, 3, True)
    assert plan.arrays is not None and plan.arrays["w"].numpy().tolist() == [0.0, 0.0]
    assert sorted(plan.sent) == sorted(strategy.node_to_client[m.metadata.dst_node_id] for m in messages)
    assert len(plan.sent) == 2
    for msg in messages:
        sent = plan.sent[strategy.node_to_client[msg.metadata.dst_node_id]]
        assert sent.address == msg.metadata.dst_node_id and sent.note == {"asked": sent.client_id}
        assert dict(sent.shapes) == {k: tuple(v.shape) for k, v in msg.content["arrays"].items()}
        assert msg.content["config"]["client-id"] == sent.client_id
    with pytest.raises(AttributeError):
        plan.server_round = 5  # type: ignore[misc]  # a record, not a place to keep state


def test_no_round_data_is_kept_on_the_strategy_between_calls(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    grid = InProcessGrid({}, 3, client_app=numpy_client())
    strategy.discover(grid, 5)
    before = dict(vars(strategy))
    messages, plan = strategy.configure_train(1, initial(), ConfigRecord(), grid)
    replies = strategy.exchange(grid, messages, timeout=5)
    strategy.aggregate_train(plan, replies)
    messages, plan = strategy.configure_evaluate(1, initial(), ConfigRecord(), grid)
    strategy.aggregate_evaluate(plan, strategy.exchange(grid, messages, timeout=5))
    assert vars(strategy) == before


def test_a_reply_is_judged_by_the_plan_it_is_aggregated_with(tmp_path: Path) -> None:
    """Replies of a round aggregated with another round's plan: what that plan did not send is
    rejected, and the rest must carry exactly the names and shapes that plan sent."""
    strategy = make_strategy(tmp_path)
    grid = InProcessGrid({}, 3, client_app=numpy_client())
    strategy.discover(grid, 5)
    messages, plan = strategy.configure_train(1, initial(), ConfigRecord(), grid)
    replies = strategy.exchange(grid, messages, timeout=5)
    only_0 = {0: plan.sent[0]}
    narrower = {1: Sent(1, plan.sent[1].address, {"w": (2,)})}
    other = RoundPlan("train", 1, plan.arrays, {**only_0, **narrower}, 3)
    _, metrics = strategy.aggregate_train(other, replies)
    assert metrics["num-clients"] == 1
    rejected = strategy.recorder.data["rounds"][0]["train"]["rejected"]
    assert "without a message sent to it" in rejected["2"]
    assert "unknown: ['b']" in rejected["1"]
