"""Pipelined evaluation (strategies/pipeline.py): round r's evaluation goes out with round r+1's
training, in one exchange, and every client computes and every round records exactly what the
unpipelined loop computes and records."""

from __future__ import annotations

import json
from pathlib import Path

import fedhelpers
import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedvit.inprocess import InProcessGrid
from fedvit.wire import EVAL_ARRAYS, EVAL_CONFIG, EVAL_METRICS, to_record
from strategies.pipeline import fuse, split
from strategies.rounds import Replies

TINY = (
    "model.depth=1 model.embed_dim=16 model.num_heads=2 data.max_train_per_client=40 "
    "train.batch_size=32 train.local_epochs=1 server.fraction_train=0.5"
)
FEDTP = "method.options.embed_dim=8 method.options.hidden=16"


@pytest.fixture(autouse=True)
def _server_identity() -> None:
    """Messages made in this process need the identity a ServerApp process has (the grid sets it)."""
    InProcessGrid({}, 0, client_app=lambda msg, ctx: msg)


def message(kind: str, address: int, arrays: ArrayRecord, server_round: int) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, message_type=kind, dst_node_id=address)


def record(value: float) -> ArrayRecord:
    return to_record({"w": np.full(2, value, np.float32)})


# ---------------------------------------------------------------------- the exchange's messages


def test_a_client_that_trains_and_evaluates_gets_one_message_that_carries_both() -> None:
    shared = record(1.0)
    train = [message(MessageType.TRAIN, a, shared, 2) for a in (-1, -2)]
    evaluate = [message(MessageType.EVALUATE, a, shared, 1) for a in (-1, -2, -3)]
    out = fuse(train, evaluate)
    assert [(m.metadata.message_type, m.metadata.dst_node_id) for m in out] == [
        ("train", -1),
        ("train", -2),
        ("evaluate", -3),
    ]
    for msg in out[:2]:  # the evaluation's own config (its round), and no second copy of the arrays
        assert msg.content[EVAL_CONFIG]["server-round"] == 1 and msg.content["config"]["server-round"] == 2
        assert EVAL_ARRAYS not in msg.content.array_records


def test_evaluation_arrays_travel_separately_only_when_they_differ() -> None:
    train = [message(MessageType.TRAIN, -1, record(1.0), 2), message(MessageType.TRAIN, -2, record(1.0), 2)]
    evaluate = [
        message(MessageType.EVALUATE, -1, record(1.0), 1),
        message(MessageType.EVALUATE, -2, record(5.0), 1),
    ]
    first, second = fuse(train, evaluate)
    assert EVAL_ARRAYS not in first.content.array_records  # equal values, another record object
    assert np.array_equal(second.content[EVAL_ARRAYS]["w"].numpy(), [5.0, 5.0])


def reply_to(msg: Message, *, eval_metrics: bool = True, error: bool = False) -> Message:
    if error:
        return Message(Error(code=0, reason="disk full"), reply_to=msg)
    content = RecordDict({"metrics": MetricRecord({"num-examples": 1})})
    if eval_metrics and EVAL_CONFIG in msg.content.config_records:
        content[EVAL_METRICS] = MetricRecord({"test-acc": 0.5})
    reply = Message(content, reply_to=msg)
    return reply


def test_each_failure_counts_for_what_its_message_asked() -> None:
    shared = record(1.0)
    train = [message(MessageType.TRAIN, a, shared, 2) for a in (-1, -2, -3)]
    evaluate = [message(MessageType.EVALUATE, a, shared, 1) for a in (-1, -2, -4, -5)]
    out = fuse(train, evaluate)
    for i, msg in enumerate(out):
        msg.metadata.__dict__["_message_id"] = f"m{i}"
    ok = [reply_to(out[0]), reply_to(out[1], eval_metrics=False), reply_to(out[3])]
    replies = Replies(ok, ["client 2: disk full", "client 4: no reply"], [-3, -5])
    for reply, address in zip(ok, (-1, -2, -4), strict=True):
        reply.metadata.__dict__["_src_node_id"] = address  # as the exchange re-addresses them

    def failed(address: int, reason: str, part: Replies) -> None:  # as Federation._failed records
        part.failures.append(f"client {-address}: {reason}")
        part.failed.append(address)

    train_part, eval_part = split(replies, {-1, -2, -3}, {-1, -2, -4, -5}, failed)
    assert [m.metadata.src_node_id for m in train_part.ok] == [-1, -2]
    assert train_part.failed == [-3]  # -3 trained only; -5 evaluated only
    assert [m.metadata.src_node_id for m in eval_part.ok] == [-1, -4]
    assert sorted(eval_part.failed) == [-5, -2]
    assert "client 2: its pipelined reply has no eval-metrics" in eval_part.failures


# ---------------------------------------------------------------------- whole federations


def federate(
    tmp_path: Path, method: str, pipelined: bool, extra: str = ""
) -> tuple[InProcessGrid, dict, Path]:
    rc = fedhelpers.run_config(
        tmp_path / str(pipelined),
        method,
        TINY,
        3,
        f"server.pipeline_evaluation={str(pipelined).lower()} {extra}",
    )
    rc["num-clients"] = 4
    return fedhelpers.federate(rc)


def recorded(results: dict) -> list:
    """Per round: the training clients and loss, and every client's evaluation."""
    out = []
    for r in results["rounds"]:
        ev = r.get("eval", {})
        out.append((r["round"], r["train"]["clients"], r["train"].get("loss"), ev.get("per_client")))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "extra"),
    [("fedper", ""), ("perfedavg", ""), ("apfl", ""), ("fedtp", FEDTP)],
)
def test_pipelined_rounds_record_exactly_what_one_exchange_per_step_records(
    tmp_path: Path, method: str, extra: str
) -> None:
    # fedper: the private head changes in training, so an evaluation after it would differ;
    # perfedavg adapts at evaluation, which must not reach the training that follows; apfl mixes a
    # private model; fedtp sends each client generated arrays
    grid_a, a, dir_a = federate(tmp_path, method, pipelined=False, extra=extra)
    grid_b, b, dir_b = federate(tmp_path, method, pipelined=True, extra=extra)
    assert a["status"] == b["status"] == "completed"
    assert recorded(a) == recorded(b)
    assert a["summary"]["last_round"] == b["summary"]["last_round"]
    kinds = lambda grid: [m.metadata.message_type for m in grid.sent]  # noqa: E731
    # 2 clients train a round, all 4 evaluate: 2 of the 4 evaluations ride on the next training
    assert kinds(grid_a).count("evaluate") == 12 and kinds(grid_b).count("evaluate") == 8
    with np.load(dir_a / "checkpoint" / "arrays.npz") as x, np.load(dir_b / "checkpoint" / "arrays.npz") as y:
        assert x.files == y.files
        for k in x.files:
            np.testing.assert_array_equal(x[k], y[k])


class LostInRound3(InProcessGrid):
    """A grid whose SuperLink goes away in round 3's training exchange (with round 2's evaluation)."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if any(
            m.metadata.message_type == "train" and m.content["config"]["server-round"] == 3 for m in messages
        ):
            raise ConnectionError("SuperLink lost")
        return super().send_and_receive(messages, timeout=timeout)


def test_an_interrupted_pipelined_run_resumes_after_its_last_closed_round(tmp_path: Path) -> None:
    from fedvit.config import load_config
    from fedvit.server_app import run

    rc = fedhelpers.run_config(tmp_path, "fedper", TINY, 3)
    rc["num-clients"] = 4
    with pytest.raises(ConnectionError):
        run(LostInRound3(rc, 4), load_config(rc))
    (run_dir,) = (tmp_path / "out").iterdir()
    # round 2 was aggregated but its evaluation never came back: round 1 is the last closed one
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"] == 1
    resumed = {**rc, "resume": str(run_dir)}
    run(InProcessGrid(resumed, 4), load_config(resumed))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["resumed_at_round"] == 1
    assert [(r["round"], "eval" in r) for r in results["rounds"]] == [(1, True), (2, True), (3, True)]


def test_an_exchange_of_both_kinds_is_ordered_by_expected_work() -> None:
    from strategies.base import PersonalizedStrategy, virtual_address
    from strategies.federation import TRAIN_EXAMPLE_COST

    strategy = PersonalizedStrategy(shared_shapes={"w": (2,)}, num_clients=3)
    for cid in range(3):
        strategy.node_to_client[virtual_address(cid)] = cid
        strategy.client_info[cid] = {"num_train": 10, "num_val": 5, "num_test": 15 + 20 * (cid == 2)}
    shared = record(1.0)
    train = [message(MessageType.TRAIN, virtual_address(c), shared, 2) for c in (0, 1)]
    (pipelined, plain, evaluation) = fuse(
        train, [message(MessageType.EVALUATE, virtual_address(c), shared, 1) for c in (0, 2)]
    )
    cost = strategy.message_cost
    assert cost(plain) == TRAIN_EXAMPLE_COST * 10  # a trained example: forward, backward and step
    assert cost(pipelined) == TRAIN_EXAMPLE_COST * 10 + 20  # and the evaluation it carries
    assert cost(evaluation) == 40
