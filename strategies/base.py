"""The base personalized-FL strategy on Flower's Message API.

What crosses the wire each round:

* ``query`` (once, and for nodes that join later): who each node is (:mod:`strategies.federation`).
* ``train``: to each sampled client, ``arrays`` = what :meth:`PersonalizedStrategy.train_arrays`
  gives for *that* client (the same global shared parameters by default) and ``config`` =
  {``server-round``, ``run-name``, ``run-key``, ``client-id``} plus what :meth:`client_config`
  adds. The reply carries the client's shared parameters (never private ones), ``num-examples``
  and its metrics.
* The server checks each reply against what its message carried (names, shapes, finite values;
  bad replies are rejected and logged), then :meth:`aggregate_shared` (sample-weighted mean by
  default) produces the new shared parameters.
* ``evaluate`` (every ``eval-every`` rounds, in ``server.eval_full_rounds`` and after the last):
  **every** known client (by default; with ``server.eval_fraction < 1`` a seeded sample of them,
  except in the last round and the ``eval_full_rounds``) gets :meth:`evaluate_arrays` (by default
  what training would send), combines them with its private ones and reports its personalized
  model's test and validation metrics; per-client numbers are kept, and each round is marked
  ``full`` or ``sampled``. With ``server.pipeline_evaluation`` (the default) a round's evaluation
  goes out in the next round's training exchange: a client in both gets one ``train`` message
  that also carries its ``eval-config`` (and ``eval-arrays`` when they differ from its training
  arrays) and replies ``eval-metrics`` too (:mod:`strategies.pipeline`).

A round is a value (:mod:`strategies.rounds`): ``configure_*`` returns the messages and a
:class:`RoundPlan` of what was sent, and the base hands that plan to :meth:`check_update`,
:meth:`aggregate_shared` and :meth:`client_eval_metrics`. The only attributes that outlive a
call are the server's state: the federation (:class:`~strategies.federation.Federation`) and
what :meth:`state_dict` checkpoints (:mod:`strategies.checkpoint`) after each round.

Override points for methods: :meth:`train_arrays` / :meth:`evaluate_arrays` (per-client
messages), :meth:`client_config`, :meth:`check_update`, :meth:`aggregate_shared`,
:meth:`client_eval_metrics`, :meth:`state_dict` / :meth:`load_state_dict`,
:meth:`server_resources`, :attr:`exportable`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from fedvit.params import UpdateError, check_arrays
from fedvit.privacy import SharedDP, privatize, progress, train_metrics
from fedvit.registry import method_options, register_strategy
from fedvit.results import RunRecorder
from fedvit.wire import to_numpy, to_record
from strategies.checkpoint import read_checkpoint, write_checkpoint
from strategies.federation import Federation, virtual_address
from strategies.pipeline import PendingRound, evaluation_metrics, fuse, split
from strategies.reporting import eval_record, progress_line
from strategies.rounds import (
    ARRAYS,
    CONFIG,
    METRICS,
    ClientUpdate,
    Payload,
    Replies,
    RoundFailedError,
    RoundPlan,
    Run,
    Sent,
    array_shapes,
    weighted_mean,
)
from strategies.schedule import EvalSchedule

__all__ = [
    "ClientUpdate",
    "Payload",
    "PersonalizedStrategy",
    "Replies",
    "RoundFailedError",
    "RoundPlan",
    "Sent",
    "to_numpy",
    "to_record",
    "virtual_address",
    "weighted_mean",
]


@register_strategy("personalized")
class PersonalizedStrategy(Federation):
    """FedAvg over the shared split with per-client messages, checkpoints and per-client
    evaluation of personalized models. FedAvg, Local and FedPer are this class with
    different private groups."""

    #: Whether every client's shared parameters are the checkpoint's, which ``fedvit export``
    #: combines with its private ones; ``False`` for a server that makes per-client parameters
    #: (read by :func:`fedvit.export.check_exportable`, with the client's ``export`` policy).
    exportable: ClassVar[bool] = True
    #: Why this server cannot take client-level DP on the shared split (``dp.enabled``, see
    #: :mod:`fedvit.privacy`); ``None``: it aggregates the clients' shared updates into one release.
    dp_refusal: ClassVar[str | None] = None
    #: Whether a training reply is the update itself (FFGG's gradient), not shared parameters.
    dp_replies_are_updates: ClassVar[bool] = False
    #: The run's private aggregation (``dp.enabled``), set by :meth:`from_config`.
    privacy: SharedDP | None = None

    def __init__(
        self,
        *,
        shared_shapes: Mapping[str, tuple[int, ...]],
        num_clients: int,
        fraction_train: float = 1.0,
        min_train_clients: int = 1,
        min_available_clients: int | None = None,
        eval_every: int = 1,
        eval_fraction: float = 1.0,
        eval_min_clients: int = 1,
        eval_full_rounds: Iterable[int] = (),
        seed: int = 0,
        run_name: str = "run",
        recorder: RunRecorder | None = None,
        checkpoint_dir: Path | None = None,
        pipeline_evaluation: bool = True,
    ) -> None:
        min_available = min_available_clients if min_available_clients is not None else num_clients
        super().__init__(
            num_clients=num_clients, min_available_nodes=min_available, run_name=run_name, recorder=recorder
        )
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_clients
        self.shared_shapes = {k: tuple(v) for k, v in shared_shapes.items()}
        self.schedule = EvalSchedule.of(eval_every, eval_fraction, eval_min_clients, eval_full_rounds, seed)
        self.seed = seed
        self.checkpoint_dir = checkpoint_dir
        #: Whether a round's evaluation goes out in the next round's training exchange
        #: (:mod:`strategies.pipeline`); ``server.pipeline_evaluation``.
        self.pipeline_evaluation = pipeline_evaluation
        self.num_rounds = 0

    @classmethod
    def from_config(cls, cfg, *, model, split, recorder, run_dir: Path, run_name: str, **kwargs: Any):
        """Build from a :class:`~fedvit.config.FedvitConfig`.

        Subclasses with knobs declare an ``Options`` dataclass (typed ``method.options``, see
        :func:`fedvit.registry.method_options`) and receive it as ``options=``."""
        if getattr(cls, "Options", None) is not None:
            kwargs.setdefault("options", method_options(cfg)[1])
        strategy = cls(
            shared_shapes=split.shapes(model, "shared"),
            num_clients=cfg.clients.num_clients,
            fraction_train=cfg.server.fraction_train,
            min_train_clients=cfg.server.min_train_clients,
            min_available_clients=cfg.server.min_available_clients,
            eval_every=cfg.server.eval_every,
            eval_fraction=cfg.server.eval_fraction,
            eval_min_clients=cfg.server.eval_min_clients,
            eval_full_rounds=cfg.server.eval_full_rounds,
            seed=cfg.seed,
            run_name=run_name,
            recorder=recorder,
            checkpoint_dir=run_dir / "checkpoint" if cfg.server.checkpoint else None,
            pipeline_evaluation=cfg.server.pipeline_evaluation,
            **kwargs,
        )
        if recorder is not None:
            recorder.set_evaluation(strategy.schedule.protocol())
        strategy.privacy = SharedDP.from_config(cfg)
        return strategy

    def summary(self) -> None:
        """Log what the strategy does (subclasses add their line, then call this)."""
        log(
            INFO,
            "\t├──> %s: %d shared tensors, %d clients",
            type(self).__name__,
            len(self.shared_shapes),
            self.num_clients,
        )
        log(
            INFO,
            "\t├──> Training: %.2f of the live clients per round (at least %d), %d must be available",
            self.fraction_train,
            self.min_train_nodes,
            self.min_available_nodes,
        )
        log(INFO, "\t└──> Evaluation: %s", self.schedule.protocol()["description"])

    # ------------------------------------------------------------------ override points

    def train_arrays(self, server_round: int, client_id: int, arrays: ArrayRecord) -> Payload:
        """What the ``train`` message to ``client_id`` carries (default: the round's shared
        arrays, the same for everyone), and what the server notes about it for the reply."""
        return Payload(arrays)

    def evaluate_arrays(self, server_round: int, client_id: int, arrays: ArrayRecord) -> Payload:
        """What the ``evaluate`` message to ``client_id`` carries (default: what training would)."""
        return self.train_arrays(server_round, client_id, arrays)

    def client_config(self, server_round: int, client_id: int, config: ConfigRecord) -> ConfigRecord:
        """The config sent to ``client_id``: the round's config plus its identity."""
        out = ConfigRecord(dict(config))
        out["server-round"] = server_round
        out["run-name"] = self.run_name
        out["run-key"] = self.run_key
        out["client-id"] = client_id
        return out

    def aggregate_shared(self, plan: RoundPlan, updates: list[ClientUpdate]) -> ArrayRecord:
        """New shared parameters from a round's accepted updates (sample-weighted mean);
        ``plan.arrays`` are the ones the round started from."""
        return to_record(weighted_mean(updates, self.shared_shapes))

    def sender(self, update: ClientUpdate) -> str:
        """How errors about ``update`` name its sender."""
        return f"client {update.client_id}"

    def check_update(self, update: ClientUpdate, sent: Sent) -> None:
        """Raise :class:`UpdateError` for a reply that must not be aggregated (default: unless it
        carries exactly the names and shapes its message carried, finite, with examples)."""
        check_arrays(update.arrays, sent.shapes, who=self.sender(update))
        if update.num_examples <= 0:
            raise UpdateError(
                f"client {update.client_id}: num-examples must be > 0, got {update.num_examples}"
            )

    def client_eval_metrics(
        self, client_id: int, metrics: dict[str, Any], sent: Sent | None
    ) -> dict[str, Any]:
        """Client ``client_id``'s evaluation metrics as recorded (and summarized over clients);
        a strategy may derive more from what it knows and what it sent (``sent``; ``None`` for a
        reply it cannot place)."""
        return metrics

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Extra server state to checkpoint: (arrays, JSON-serializable dict)."""
        return {}, {}

    def load_state_dict(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def server_resources(self) -> dict[str, float]:
        """What the server itself holds beyond the model (e.g. a hypernetwork's parameters);
        merged into ``results.json`` ``resources``."""
        return {}

    @classmethod
    def check_privacy(cls, cfg: Any) -> None:
        """``ConfigError`` unless this server can apply ``dp`` (:func:`fedvit.privacy.check`): refused
        when the class sets :attr:`dp_refusal`, or replaces the round loop or ``aggregate_train``, where
        :func:`~fedvit.privacy.privatize` runs."""
        reason = cls.dp_refusal
        for name in ("aggregate_train", "start", "run_rounds"):
            if reason is None and getattr(cls, name, None) is not getattr(PersonalizedStrategy, name, None):
                reason = f"{cls.__name__} overrides {name}, where the private release is made"
        if reason:
            from fedvit.config import ConfigError

            raise ConfigError(f"method '{cfg.method.name}': dp.enabled is not supported: {reason}")

    # ------------------------------------------------------------------ training

    def sample_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """Seeded sample of ``fraction_train`` of the live clients (at least ``min_train_nodes``)."""
        nodes = self._live_nodes(grid)
        size = min(len(nodes), max(self.min_train_nodes, round(self.fraction_train * len(nodes))))
        rng = random.Random(self.seed * 100_003 + server_round)
        return sorted(rng.sample(nodes, size), key=self.node_to_client.__getitem__)

    def plan_messages(
        self,
        kind: str,
        server_round: int,
        nodes: list[int],
        arrays: ArrayRecord,
        config: ConfigRecord,
        live: int,
    ) -> tuple[list[Message], RoundPlan]:
        """One ``kind`` message per address in ``nodes`` (arrays from :meth:`train_arrays` or
        :meth:`evaluate_arrays`, config from :meth:`client_config`) and the plan that records them."""
        make = self.train_arrays if kind == MessageType.TRAIN else self.evaluate_arrays
        messages, sent, shapes = [], {}, {}
        for node in nodes:
            cid = self.node_to_client[node]
            payload = make(server_round, cid, arrays)
            content = RecordDict(
                {ARRAYS: payload.arrays, CONFIG: self.client_config(server_round, cid, config)}
            )
            messages.append(Message(content=content, message_type=kind, dst_node_id=node))
            if id(payload.arrays) not in shapes:  # one shape table per distinct record
                shapes[id(payload.arrays)] = array_shapes(payload.arrays)
            sent[cid] = Sent(cid, node, shapes[id(payload.arrays)], payload.note)
        return messages, RoundPlan(kind, server_round, arrays, sent, live)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> tuple[list[Message], RoundPlan]:
        """The ``train`` messages of a seeded sample of the live clients, and their plan."""
        nodes, live = self.sample_nodes(server_round, grid), self._live_nodes(grid)
        messages, plan = self.plan_messages(MessageType.TRAIN, server_round, nodes, arrays, config, len(live))
        log(INFO, "configure_train: %d clients", len(messages))
        return messages, plan

    def parse_update(self, msg: Message, plan: RoundPlan) -> ClientUpdate:
        """A training reply as a :class:`ClientUpdate` checked against what ``plan`` sent its
        client (raises :class:`UpdateError` & co.)."""
        node = msg.metadata.src_node_id
        cid = self.node_to_client.get(node, -1)
        metrics = dict(msg.content[METRICS])
        arrays = to_numpy(msg.content[ARRAYS]) if ARRAYS in msg.content.array_records else {}
        update = ClientUpdate(cid, node, arrays, int(metrics.get("num-examples", 0)), metrics)
        if int(metrics.get("client-id", cid)) != cid:
            raise UpdateError(f"node {node} answered as client {metrics.get('client-id')}, expected {cid}")
        if cid not in plan.sent:
            raise UpdateError(
                f"client {cid}: an update without a message sent to it in round {plan.server_round}"
            )
        self.check_update(update, plan.sent[cid])
        return update

    def aggregate_train(self, plan: RoundPlan, replies: Replies) -> tuple[ArrayRecord, MetricRecord]:
        """Check every reply, record the round's training, aggregate the accepted updates."""
        updates: list[ClientUpdate] = []
        rejected: dict[str, str] = {}
        per_client: dict[int, dict[str, float]] = {}
        for msg in replies.ok:
            cid = self.node_to_client.get(msg.metadata.src_node_id, -1)
            try:
                update = self.parse_update(msg, plan)
            except (UpdateError, KeyError, TypeError, ValueError) as err:
                rejected[str(cid)] = str(err)
                log(WARNING, "Rejected update of client %d (node %d): %s", cid, msg.metadata.src_node_id, err)
                continue
            updates.append(update)
            per_client[cid] = {k: v for k, v in update.metrics.items() if k not in ("client-id",)}
        if self.recorder is not None:
            self.recorder.record_train(plan.server_round, per_client, rejected, replies.failures)
        if not updates:
            reasons = replies.failures + [f"client {c}: {r}" for c, r in rejected.items()]
            raise RoundFailedError(
                f"round {plan.server_round}: no client produced an update; " + "; ".join(reasons[:3])
            )
        shared = updates
        if self.privacy is not None:  # dp: one release of the clipped, averaged, noised updates
            current = None if self.dp_replies_are_updates else to_numpy(plan.arrays)
            shared = privatize(self.privacy, plan.server_round, updates, current, self.recorder)
        aggregated = self.aggregate_shared(plan, shared)
        losses = [u.metrics.get("train-loss", float("nan")) for u in updates]
        return aggregated, MetricRecord(
            {
                "train-loss": float(np.nanmean(losses)),
                "num-clients": len(updates),
                **train_metrics(self.privacy, plan.server_round),
            }
        )

    # ------------------------------------------------------------------ evaluation

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> tuple[list[Message], RoundPlan]:
        """The ``evaluate`` messages of the round (none when it is not evaluated), and their plan."""
        if not self.schedule.due(server_round, self.num_rounds):
            return [], RoundPlan(MessageType.EVALUATE, server_round, arrays, {}, 0)
        live = self._live_nodes(grid)
        nodes = self.schedule.sample(server_round, self.num_rounds, live, self.node_to_client.__getitem__)
        messages, plan = self.plan_messages(
            MessageType.EVALUATE, server_round, nodes, arrays, config, len(live)
        )
        if plan.sampled:
            log(INFO, "configure_evaluate: %d of %d clients (sampled)", len(nodes), len(live))
        return messages, plan

    def aggregate_evaluate(self, plan: RoundPlan, replies: Replies) -> MetricRecord | None:
        """Record every client's evaluation and the statistics over clients."""
        per_client: dict[int, dict[str, float]] = {}
        for msg in replies.ok:
            metrics = evaluation_metrics(msg)
            cid = int(metrics.pop("client-id", self.node_to_client.get(msg.metadata.src_node_id, -1)))
            per_client[cid] = self.client_eval_metrics(cid, metrics, plan.sent.get(cid))
        if not per_client or self.recorder is None:
            return None
        self.recorder.set_evaluation(self.schedule.protocol())  # the current one, also after a resume
        ev = self.recorder.record_eval(
            plan.server_round,
            per_client,
            replies.failures,
            sampled=plan.sampled,
            clients_asked=len(plan.sent),
            clients_total=plan.live,
        )
        return eval_record(ev, len(per_client), plan.sampled)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        """Atomically replace ``checkpoint/`` with the state after ``server_round``."""
        if self.checkpoint_dir is None:
            return
        extra_arrays, extra_state = self.state_dict()
        write_checkpoint(
            self.checkpoint_dir,
            server_round=server_round,
            run_name=self.run_name,
            run_key=self.run_key,
            strategy=type(self).__name__,
            arrays=to_numpy(arrays),
            extra_arrays=extra_arrays,
            state=extra_state,
        )

    def load_checkpoint(self, checkpoint_dir: Path) -> tuple[int, ArrayRecord]:
        """Restore the state saved by :meth:`save_checkpoint`; returns (round, shared arrays)."""
        saved = read_checkpoint(checkpoint_dir)
        self.run_key = saved.run_key or self.run_key
        if saved.strategy != type(self).__name__:
            raise ValueError(
                f"server.resume: checkpoint of {saved.strategy}, this run uses {type(self).__name__}"
            )
        check_arrays(saved.arrays, self.shared_shapes, who=f"checkpoint {checkpoint_dir}")
        self.load_state_dict(saved.extra_arrays, saved.state)
        return saved.round, to_record(saved.arrays)

    # ------------------------------------------------------------------ the loop

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        start_round: int = 1,
    ) -> Result:
        """Run rounds ``start_round..num_rounds`` (``start_round > 1`` when resuming): log the
        summary, discover the clients, then :meth:`run_rounds`."""
        self.num_rounds = num_rounds
        self.summary()
        if self.recorder is not None:
            self.recorder.data["run_key"] = self.run_key
        self.discover(grid, timeout)
        run = Run(grid, timeout, train_config or ConfigRecord(), evaluate_config or ConfigRecord())
        return self.run_rounds(run, initial_arrays, start_round)

    def run_rounds(self, run: Run, arrays: ArrayRecord, start_round: int) -> Result:
        """The rounds, synchronously: per round, discover new nodes, configure -> exchange ->
        aggregate training, then evaluate and close it (:meth:`close_round`). With
        :attr:`pipeline_evaluation` a round's evaluation goes out in the next round's training
        exchange (:mod:`strategies.pipeline`); otherwise in an exchange of its own right away."""
        grid, timeout, result = run.grid, run.timeout, Result()
        pending: PendingRound | None = None
        closed = time.time()
        for rnd in range(start_round, self.num_rounds + 1):
            self.discover(grid, timeout)  # nodes that joined since
            messages, plan = self.configure_train(rnd, arrays, run.train_config, grid)
            if pending is None:
                train_replies = self.exchange(grid, messages, timeout)
            else:  # the previous round's evaluation rides along
                replies = self.exchange(grid, fuse(messages, pending.messages), timeout)
                train_replies, eval_replies = split(
                    replies, plan.addresses(), pending.plan.addresses(), self._failed
                )
                closed = self.close_round(pending, eval_replies, result, closed)
            arrays, train_metrics = self.aggregate_train(plan, train_replies)
            result.arrays = arrays
            result.train_metrics_clientapp[rnd] = train_metrics
            pending = self.open_round(rnd, arrays, run.evaluate_config, grid, train_metrics)
            if not (self.pipeline_evaluation and pending.messages and rnd < self.num_rounds):
                closed = self.close_round(pending, self.evaluate_now(pending, run), result, closed)
                pending = None
        result.arrays = arrays
        return result

    def open_round(
        self, rnd: int, arrays: ArrayRecord, evaluate_config: ConfigRecord, grid: Grid, train: MetricRecord
    ) -> PendingRound:
        """Round ``rnd``, aggregated into ``arrays``, with its evaluation configured (when due)."""
        messages, plan = self.configure_evaluate(rnd, arrays, evaluate_config, grid)
        return PendingRound(rnd, arrays, messages, plan, train)

    def evaluate_now(self, pending: PendingRound, run: Run) -> Replies:
        """The replies to ``pending``'s evaluation messages, in an exchange of their own."""
        return self.exchange(run.grid, pending.messages, run.timeout) if pending.messages else Replies([], [])

    def close_round(self, pending: PendingRound, replies: Replies, result: Result, since: float) -> float:
        """:meth:`finish_round`, then the round's log line (``since``: when the round started, or the
        one before closed); returns the time it closed."""
        eval_metrics = self.finish_round(pending, replies, result)
        now = time.time()
        self._progress(pending.server_round, pending.train_metrics, eval_metrics, now - since)
        return now

    def finish_round(self, pending: PendingRound, replies: Replies, result: Result) -> MetricRecord | None:
        """Record the round's evaluation (``replies`` to its messages), end the round in the
        results and checkpoint it."""
        rnd, eval_metrics = pending.server_round, None
        if pending.messages:
            eval_metrics = self.aggregate_evaluate(pending.plan, replies)
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[rnd] = eval_metrics
        if self.recorder is not None:
            self.recorder.end_round(rnd)
        self.save_checkpoint(rnd, pending.arrays)
        return eval_metrics

    def _progress(
        self, rnd: int, train: MetricRecord | None, ev: MetricRecord | None, seconds: float
    ) -> None:
        line = progress_line(rnd, self.num_rounds, seconds, train, ev, progress(self.privacy, train))
        log(INFO, "[fedvit] %s", line)
