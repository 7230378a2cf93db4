"""A round as a value: what the server sent, what came back, and the accepted updates.

A round runs as four calls, each taking the value the one before returned; no attribute carries
round data from one call to the next (see :class:`strategies.base.PersonalizedStrategy`):

1. ``configure_train`` / ``configure_evaluate`` -> ``(messages, RoundPlan)``: one message per
   client, and the plan: per client, a :class:`Sent` (its address, the names and shapes of the
   arrays its message carried, what the method noted about them, e.g. FedTP's generated W_i).
2. ``exchange(grid, messages)`` -> :class:`Replies`: the replies that carry content, each seen
   from its client's address, and one line per client that failed (an error, or no reply).
3. ``aggregate_train(plan, replies)``: every good reply becomes a :class:`ClientUpdate`,
   checked against its ``Sent`` (it must carry exactly the names and shapes it was sent); the
   accepted ones are aggregated with the plan at hand (``plan.arrays``: where the round started).
4. ``aggregate_evaluate(plan, replies)``: per-client metrics; ``plan.sampled`` says whether
   only a sample of the live clients was asked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message

#: Keys of a message's content (Flower's ``RecordDict``).
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"


class RoundFailedError(RuntimeError):
    """No client could take part: the federation cannot make progress (the reasons are in the message)."""


@dataclass(frozen=True)
class Run:
    """What every round of a run is given: the grid, the timeout of an exchange and the configs
    the messages start from (``PersonalizedStrategy.run_rounds``)."""

    grid: Any  #: Flower's ``Grid`` (or ``fedvit.inprocess.InProcessGrid``)
    timeout: float
    train_config: ConfigRecord
    evaluate_config: ConfigRecord


@dataclass(frozen=True)
class Payload:
    """What a method puts in one client's message (``train_arrays`` / ``evaluate_arrays``):
    the ``arrays`` that cross the wire, and a ``note`` that stays on the server, in the round's
    :class:`Sent`, for when the reply comes (e.g. FedTP's W_i, to compute its change)."""

    arrays: ArrayRecord
    note: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sent:
    """One client's message of a round, as the server remembers it."""

    client_id: int
    address: int  #: the client's address: its device's node id, or its virtual address
    shapes: Mapping[str, tuple[int, ...]]  #: names and shapes of the arrays sent (a reply's too)
    note: Mapping[str, Any] = field(default_factory=dict)  #: :attr:`Payload.note`


@dataclass(frozen=True)
class RoundPlan:
    """What one ``configure_*`` call sent: the record the ``aggregate_*`` call works from."""

    kind: str  #: ``train`` or ``evaluate`` (Flower's ``MessageType``)
    server_round: int
    arrays: ArrayRecord  #: the server's shared arrays the messages were made from
    sent: Mapping[int, Sent]  #: client id -> its message
    live: int  #: clients that could take part when the round was configured
    note: Mapping[str, Any] = field(default_factory=dict)  #: round-wide method state (pFedLA: versions)

    def addresses(self) -> set[int]:
        """The addresses of the clients sent a message."""
        return {s.address for s in self.sent.values()}

    @property
    def sampled(self) -> bool:
        """Whether only a sample of the live clients was asked."""
        return len(self.sent) < self.live


@dataclass(frozen=True)
class Replies:
    """What one exchange brought back: replies with content (from their client's address) and
    one line per client that failed, naming it: its error, or no reply within the timeout."""

    ok: list[Message]
    failures: list[str]
    failed: list[int] = field(default_factory=list)  #: the address of each failure, in order


@dataclass
class ClientUpdate:
    """One client's accepted training reply."""

    client_id: int
    node_id: int
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, Any] = field(default_factory=dict)


def weighted_mean(updates: list[ClientUpdate], keys: Iterable[str]) -> dict[str, np.ndarray]:
    """Sample-weighted mean of the clients' arrays (float64 accumulation)."""
    total = float(sum(u.num_examples for u in updates))
    if total <= 0:
        raise ValueError("cannot average updates with zero total examples")
    out = {}
    for k in keys:
        acc = sum(u.arrays[k].astype(np.float64) * (u.num_examples / total) for u in updates)
        out[k] = np.asarray(acc, dtype=updates[0].arrays[k].dtype)
    return out


def array_shapes(arrays: ArrayRecord) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a record's arrays (read from their metadata, nothing decoded)."""
    return {k: tuple(v.shape) for k, v in arrays.items()}
