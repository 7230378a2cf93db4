"""Pipelined evaluation: round r's evaluation rides on round r+1's training exchange.

Round r's evaluation and round r+1's training start from the same shared arrays, the ones round r
aggregated, and neither needs the other's replies. So the base round loop
(:meth:`strategies.base.PersonalizedStrategy.run_rounds`, ``server.pipeline_evaluation``, on by
default) sends both in one exchange: the workers run both kinds of messages back to back, and a
round pays one barrier (every reply back before the server aggregates) instead of two. The barrier
is where a worker idles while the last large client of an exchange finishes; the evaluation's many
small messages now fill that time.

What each client computes is unchanged. A client in both gets **one** ``train`` message that
carries its evaluation (:data:`~fedvit.wire.EVAL_CONFIG`, plus :data:`~fedvit.wire.EVAL_ARRAYS`
when its evaluation arrays differ from its training ones): it evaluates first, with the private
state round r left it, then trains, and its reply adds :data:`~fedvit.wire.EVAL_METRICS`. The
other clients of either kind get their plain message. What changes is when round r is closed:
its evaluation is recorded and its checkpoint written when round r+1's exchange is back (the last
round's evaluation goes out alone), so an interrupted run resumes from the round before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord

from fedvit.wire import EVAL_ARRAYS, EVAL_CONFIG, EVAL_METRICS, to_numpy
from strategies.rounds import ARRAYS, CONFIG, METRICS, Replies, RoundPlan


@dataclass(frozen=True)
class PendingRound:
    """A round that is aggregated but not closed: its evaluation messages (none when the round
    is not evaluated), their plan, the arrays it checkpoints and its training metrics."""

    server_round: int
    arrays: ArrayRecord
    messages: list[Message]
    plan: RoundPlan
    train_metrics: MetricRecord


def same_arrays(a: ArrayRecord, b: ArrayRecord) -> bool:
    """Whether two records hold the same names and values (the same record object, or equal arrays)."""
    if a is b:
        return True
    x, y = to_numpy(a), to_numpy(b)
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x)


def fuse(train: list[Message], evaluate: list[Message]) -> list[Message]:
    """The messages of one pipelined exchange: each ``train`` message, carrying the evaluation of
    its client when ``evaluate`` has one for the same address (added to the message in place),
    then the ``evaluate`` messages of the clients that do not train."""
    pending = {m.metadata.dst_node_id: m for m in evaluate}
    for msg in train:
        ev = pending.pop(msg.metadata.dst_node_id, None)
        if ev is None:
            continue
        msg.content[EVAL_CONFIG] = ev.content[CONFIG]
        if not same_arrays(msg.content[ARRAYS], ev.content[ARRAYS]):
            msg.content[EVAL_ARRAYS] = ev.content[ARRAYS]
    return train + [m for m in evaluate if m.metadata.dst_node_id in pending]


def split(
    replies: Replies,
    trained: Iterable[int],
    evaluated: Iterable[int],
    failed: Callable[[int, str, Replies], None],
) -> tuple[Replies, Replies]:
    """One pipelined exchange's replies as (training replies, evaluation replies). ``trained`` /
    ``evaluated``: the addresses asked to train / to evaluate. A pipelined reply counts for both;
    one without its :data:`~fedvit.wire.EVAL_METRICS` is an evaluation failure of its client,
    recorded by ``failed(address, reason, evaluation replies)``, the exchange's own recorder
    (:meth:`~strategies.federation.Federation._failed`: one line naming the client, and a warning)."""
    train, ev = Replies([], []), Replies([], [])
    trained, evaluated = set(trained), set(evaluated)
    for msg in replies.ok:
        if msg.metadata.message_type != MessageType.TRAIN:
            ev.ok.append(msg)
            continue
        train.ok.append(msg)
        address = msg.metadata.src_node_id
        if address not in evaluated:
            continue
        if EVAL_METRICS in msg.content.metric_records:
            ev.ok.append(msg)
        else:
            failed(address, f"its pipelined reply has no {EVAL_METRICS}", ev)
    for line, address in zip(replies.failures, replies.failed, strict=True):
        for part, asked in ((train, trained), (ev, evaluated)):
            if address in asked:
                part.failures.append(line)
                part.failed.append(address)
    return train, ev


def evaluation_metrics(reply: Message) -> dict[str, Any]:
    """An evaluation reply's per-client metrics: an ``evaluate`` reply's ``metrics``, or a
    pipelined ``train`` reply's :data:`~fedvit.wire.EVAL_METRICS`."""
    if reply.metadata.message_type == MessageType.TRAIN:
        return dict(reply.content[EVAL_METRICS])
    return dict(reply.content[METRICS])
