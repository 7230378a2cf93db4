"""The base personalized-FL strategy on Flower's Message API.

What crosses the wire each round:

* ``query`` (once, and for nodes that join later): the server asks each node who it is;
  the reply's ``client-id`` builds the node -> client map, so per-client messages reach
  the right client.
* ``train``: to each sampled client, ``arrays`` = the shared parameters for *that*
  client (:meth:`PersonalizedStrategy.client_arrays`; the same global weights by
  default) and ``config`` = {``server-round``, ``run-name``, ``run-key``, ``client-id``}. The reply
  carries the client's shared parameters (never private ones) and ``num-examples``.
* The server checks each reply against the shared split (names, shapes, finite values;
  bad replies are rejected and logged), then :meth:`aggregate_shared` (sample-weighted
  mean by default) produces the new shared parameters.
* ``evaluate`` (every ``eval-every`` rounds, in ``server.eval_full_rounds`` and after the last):
  **every** known client (by default; with ``server.eval_fraction < 1`` a seeded sample of them,
  except in the last round and the ``eval_full_rounds``) gets the aggregated shared parameters,
  combines them with its private ones and reports its personalized model's test and validation
  metrics; per-client numbers are kept, and each round is marked ``full`` or ``sampled``.

After each round the strategy checkpoints (shared arrays, its own state, the round) so a
run can resume; subclasses with more server state extend :meth:`state_dict` /
:meth:`load_state_dict`.
"""

from __future__ import annotations

import json
import random
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fedvit.params import UpdateError, check_arrays
from fedvit.registry import method_options, register_strategy
from fedvit.results import RunRecorder, atomic_write_text
from fedvit.wire import DESCRIBE, VIRTUAL_WORKER, to_numpy, to_record, unpack_client_info

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"


def virtual_address(client_id: int) -> int:
    """The address of a virtual client (negative: never a Flower node id)."""
    return -(client_id + 1)


class RoundFailedError(RuntimeError):
    """No client could take part: the federation cannot make progress (the reasons are in the message)."""


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


@register_strategy("personalized")
class PersonalizedStrategy(FedAvg):
    """FedAvg over the shared split with per-client messages, checkpoints and per-client
    evaluation of personalized models. FedAvg, Local and FedPer are this class with
    different private groups."""

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
    ) -> None:
        min_available = min_available_clients if min_available_clients is not None else num_clients
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=min_train_clients,
            min_evaluate_nodes=1,
            min_available_nodes=min_available,
            weighted_by_key="num-examples",
        )
        self.shared_shapes = {k: tuple(v) for k, v in shared_shapes.items()}
        self.num_clients = num_clients
        self.eval_every = eval_every
        if not 0 < eval_fraction <= 1:
            raise ValueError(f"eval_fraction must be in (0, 1], got {eval_fraction}")
        self.eval_fraction = float(eval_fraction)
        self.eval_min_clients = max(1, int(eval_min_clients))
        self.eval_full_rounds = frozenset(int(r) for r in eval_full_rounds)
        # the evaluation being configured: (round, sampled?, clients asked, live clients)
        self._eval_plan: tuple[int, bool, int, int] | None = None
        self.seed = seed
        self.run_name = run_name
        # Unique per run (kept on resume): clients key their default state directory by it, so a
        # new run never picks up the private state of an earlier run with the same name.
        self.run_key = f"{run_name}-{uuid.uuid4().hex[:8]}"
        self.recorder = recorder
        self.checkpoint_dir = checkpoint_dir
        self.node_to_client: dict[int, int] = {}  # address (a device's node, or virtual_address) -> client
        self.workers: list[int] = []  # simulated nodes that serve virtual clients
        self.client_info: dict[int, dict[str, Any]] = {}
        self.num_rounds = 0
        self._current: ArrayRecord | None = None
        # the last exchange (see exchange()): message id -> node, nodes without a reply, timeout
        self._sent: dict[str, int] = {}
        self._unanswered: list[int] = []
        self._timeout = float("nan")

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
            **kwargs,
        )
        if recorder is not None:
            recorder.set_evaluation(strategy.evaluation_protocol())
        return strategy

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> %s: %d shared tensors, %d clients",
            type(self).__name__,
            len(self.shared_shapes),
            self.num_clients,
        )
        super().summary()

    # ------------------------------------------------------------------ override points

    def client_arrays(self, server_round: int, client_id: int, arrays: ArrayRecord) -> ArrayRecord:
        """The shared parameters sent to ``client_id`` (default: the same for everyone)."""
        return arrays

    def client_config(self, server_round: int, client_id: int, config: ConfigRecord) -> ConfigRecord:
        """The config sent to ``client_id``: the round's config plus its identity."""
        out = ConfigRecord(dict(config))
        out["server-round"] = server_round
        out["run-name"] = self.run_name
        out["run-key"] = self.run_key
        out["client-id"] = client_id
        return out

    def aggregate_shared(
        self, server_round: int, updates: list[ClientUpdate], current: ArrayRecord | None
    ) -> ArrayRecord:
        """New shared parameters from accepted updates (sample-weighted mean)."""
        return to_record(weighted_mean(updates, self.shared_shapes))

    def expected_shapes(self, update: ClientUpdate) -> Mapping[str, tuple[int, ...]]:
        """Names and shapes ``update`` must carry (default: the shared split)."""
        return self.shared_shapes

    def sender(self, update: ClientUpdate) -> str:
        """How errors about ``update`` name its sender."""
        return f"client {update.client_id}"

    def check_update(self, update: ClientUpdate) -> None:
        """Raise :class:`UpdateError` for a reply that must not be aggregated."""
        check_arrays(update.arrays, self.expected_shapes(update), who=self.sender(update))
        if update.num_examples <= 0:
            raise UpdateError(
                f"client {update.client_id}: num-examples must be > 0, got {update.num_examples}"
            )

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Extra server state to checkpoint: (arrays, JSON-serializable dict)."""
        return {}, {}

    def client_eval_metrics(self, client_id: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Client ``client_id``'s evaluation metrics as recorded (and summarized over clients);
        a strategy may derive more from what it knows (anytime: accuracy at compute budgets)."""
        return metrics

    @classmethod
    def check_export(cls, cfg: Any) -> None:
        """``ConfigError`` unless a client's shared parameters are the checkpoint's (what ``fedvit
        export`` combines with its private ones). Default: refused when the class overrides
        :meth:`client_arrays` (a server that makes per-client parameters, e.g. FedTP, pFedLA)."""
        if cls.client_arrays is not PersonalizedStrategy.client_arrays:
            from fedvit.config import ConfigError

            raise ConfigError(
                f"method '{cfg.method.name}': the server sends each client its own parameters "
                f"({cls.__name__}.client_arrays), which the checkpoint does not hold; export is not supported"
            )

    def server_resources(self) -> dict[str, float]:
        """What the server itself holds beyond the model (e.g. a hypernetwork's parameters);
        merged into ``results.json`` ``resources``."""
        return {}

    def load_state_dict(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    # ------------------------------------------------------------------ client identity

    def discover(self, grid: Grid, timeout: float) -> None:
        """Ask every new node who it is until enough clients are available.

        A device answers with its client id (and data sizes). A *virtual worker* (a simulated node
        with no node config of its own, see ``fedvit.client_app.is_virtual_worker``) answers that it
        serves any client: then every client without a device of its own becomes a virtual client
        at address :func:`virtual_address` and its messages are routed to live workers
        (:meth:`route`). The workers describe those clients in one batched query each."""
        started = time.perf_counter()
        deadline = time.time() + timeout
        problems: list[str] = []
        known = (len(self.node_to_client), len(self.workers))
        while True:
            nodes = list(grid.get_node_ids())
            new = [n for n in nodes if n not in self.node_to_client and n not in self.workers]
            if new:
                problems += self._identify(grid, new, nodes, timeout)
            available = len(self._live_nodes(grid))
            if available >= self.min_available_nodes:
                break
            if problems and len(nodes) >= self.min_available_nodes:  # every node answered: too few can start
                raise RoundFailedError(
                    f"only {available} of {self.min_available_nodes} clients could start; "
                    + "; ".join(problems[:3])
                )
            if time.time() > deadline:
                raise TimeoutError(
                    f"only {available} of {self.min_available_nodes} clients connected in {timeout}s"
                )
            log(INFO, "Waiting for clients: %d of %d connected", available, self.min_available_nodes)
            time.sleep(1.0)
        if (len(self.node_to_client), len(self.workers)) == known:
            return  # nobody new
        identified = time.perf_counter() - started
        if self.workers:
            self._describe_virtual_clients(grid, timeout)
        seconds = time.perf_counter() - started
        if self.recorder is not None:
            self.recorder.set_clients(self.client_info)
            timing = {"total_s": round(seconds, 3), "identify_s": round(identified, 3)}
            self.recorder.data.setdefault("discovery", []).append(timing)
        devices = {c: n for n, c in self.node_to_client.items() if n >= 0}
        virtual = sum(1 for n in self.node_to_client if n < 0)
        log(
            INFO,
            "Clients: %d on devices%s, %d virtual on %d simulated workers (discovery %.1fs)",
            len(devices),
            f" {dict(sorted(devices.items()))}" if 0 < len(devices) <= 32 else "",
            virtual,
            len(self.workers),
            seconds,
        )

    def _query(self, node: int, **config: Any) -> Message:
        record = ConfigRecord({"run-name": self.run_name, "run-key": self.run_key, **config})
        return Message(content=RecordDict({CONFIG: record}), message_type=MessageType.QUERY, dst_node_id=node)

    def _identify(self, grid: Grid, new: list[int], nodes: list[int], timeout: float) -> list[str]:
        """Query ``new`` nodes; record devices (node -> client) and virtual workers. Problems."""
        problems = []
        for reply in grid.send_and_receive([self._query(n) for n in new], timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                problems.append(f"node {node}: {reply.error.reason}")
                log(WARNING, "node %d did not identify itself: %s", node, reply.error.reason)
                continue
            metrics = dict(reply.content[METRICS])
            if metrics.get(VIRTUAL_WORKER):
                self.workers.append(node)
                continue
            cid = int(metrics.pop("client-id"))
            for other in [n for n, c in self.node_to_client.items() if c == cid]:
                if other >= 0 and other in nodes:
                    raise ValueError(f"nodes {other} and {node} both claim client id {cid}")
                del self.node_to_client[other]  # the client reconnected as a new node (or left a worker)
            self.node_to_client[node] = cid
            self.client_info[cid] = {k.replace("-", "_"): v for k, v in metrics.items()}
        if self.workers:
            devices = set(self.node_to_client.values())
            for cid in range(self.num_clients):
                if cid not in devices:
                    self.node_to_client[virtual_address(cid)] = cid
        return problems

    def _describe_virtual_clients(self, grid: Grid, timeout: float) -> None:
        """One query per worker describes a share of the virtual clients that are not described yet
        (sizes, label histograms, what the method's client reports about itself)."""
        todo = sorted(c for n, c in self.node_to_client.items() if n < 0 and c not in self.client_info)
        live = [w for w in self.workers if w in set(grid.get_node_ids())]
        if not todo or not live:
            return
        shares = [todo[i :: len(live)] for i in range(len(live))]
        queries = [self._query(w, **{DESCRIBE: part}) for w, part in zip(live, shares, strict=True) if part]
        for reply in grid.send_and_receive(queries, timeout=timeout):
            if reply.has_error():
                log(WARNING, "a worker could not describe its clients: %s", reply.error.reason)
                continue
            self.client_info.update(unpack_client_info(dict(reply.content[METRICS])))

    def _live_nodes(self, grid: Grid) -> list[int]:
        """Addresses of the clients that can take part now: devices whose node is connected and,
        while a simulated worker is connected, every virtual client."""
        live = set(grid.get_node_ids())
        working = any(w in live for w in self.workers)
        return sorted(
            (n for n in self.node_to_client if n in live or (n < 0 and working)),
            key=self.node_to_client.__getitem__,
        )

    def sample_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """Seeded sample of ``fraction_train`` of the live clients (at least ``min_train_nodes``)."""
        nodes = self._live_nodes(grid)
        size = min(len(nodes), max(self.min_train_nodes, round(self.fraction_train * len(nodes))))
        rng = random.Random(self.seed * 100_003 + server_round)
        return sorted(rng.sample(nodes, size), key=self.node_to_client.__getitem__)

    # ------------------------------------------------------------------ Flower Strategy API

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = [
            self.train_message(server_round, node, arrays, config)
            for node in self.sample_nodes(server_round, grid)
        ]
        log(INFO, "configure_train: %d clients", len(messages))
        return messages

    def train_message(
        self, server_round: int, node: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> Message:
        """The ``train`` message for ``node``: its client's arrays and config."""
        cid = self.node_to_client[node]
        content = RecordDict(
            {
                ARRAYS: self.client_arrays(server_round, cid, arrays),
                CONFIG: self.client_config(server_round, cid, config),
            }
        )
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)

    def message_cost(self, msg: Message) -> float:
        """Expected work of a message, for scheduling: the client's training examples for
        ``train``, its validation and test examples for ``evaluate`` (1 when unknown)."""
        info = self.client_info.get(self.node_to_client.get(msg.metadata.dst_node_id, -1), {})
        if msg.metadata.message_type == MessageType.TRAIN:
            return float(info.get("num_train", 1) or 1)
        return float((info.get("num_val", 0) or 0) + (info.get("num_test", 0) or 0) or 1)

    def route(self, grid: Grid, messages: list[Message]) -> dict[int, int]:
        """Send each virtual client's message to a live worker; returns ``id(message) -> address``.

        Flower's simulation hands a node's messages to its workers one per node per pass, in the
        order the nodes were created, whatever order they were sent in. So the messages are sorted
        by :meth:`message_cost` (largest first) and dealt round-robin over the workers: the k-th
        pass carries the k-th largest band, and no core idles at the end of a round behind one
        large client that started last (longest-processing-time-first, band by band)."""
        addresses = {id(m): m.metadata.dst_node_id for m in messages}
        virtual = [m for m in messages if m.metadata.dst_node_id < 0]
        if virtual:
            live = set(grid.get_node_ids())
            workers = [w for w in self.workers if w in live]
            if not workers:
                raise RoundFailedError("no simulated worker is connected to serve the virtual clients")
            virtual.sort(key=lambda m: (-self.message_cost(m), self.node_to_client[m.metadata.dst_node_id]))
            for i, msg in enumerate(virtual):
                msg.metadata.dst_node_id = workers[i % len(workers)]
        return addresses

    @staticmethod
    def readdress(reply: Message, address: int) -> Message:
        """Present ``reply`` as coming from the client's address (a virtual client's worker, or
        node 0 for an error the SuperLink wrote itself), so every later step sees the client."""
        if reply.metadata.src_node_id != address:
            reply.metadata.__dict__["_src_node_id"] = address
        return reply

    def push(self, grid: Grid, messages: Iterable[Message]) -> dict[str, int]:
        """``grid.push_messages`` with routing; returns ``message id -> address``."""
        sent = list(messages)
        addresses = self.route(grid, sent)
        ids = list(grid.push_messages(sent))
        return {mid: addresses[id(m)] for mid, m in zip(ids, sent, strict=True)}

    def readdressed(self, replies: Iterable[Message], sent: Mapping[str, int]) -> list[Message]:
        """Each reply :meth:`readdress`-ed to the address its message was for (``sent``: message
        id -> address); a reply to no known message keeps its source."""
        return [
            self.readdress(r, sent.get(r.metadata.reply_to_message_id, r.metadata.src_node_id))
            for r in replies
        ]

    def pull(self, grid: Grid, sent: Mapping[str, int]) -> list[Message]:
        """``grid.pull_messages`` for ``sent`` (from :meth:`push`), each reply re-addressed."""
        return self.readdressed(grid.pull_messages(list(sent)), sent)

    def exchange(self, grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
        """``grid.send_and_receive`` with routing (:meth:`route`) that remembers which client each
        message was for, so that every reply is seen from its client's address and
        :meth:`_split_replies` can name the client of an error the SuperLink wrote itself (a lost
        node's "Node Unavailable" comes from node 0) and of a message never answered."""
        sent = list(messages)
        addresses = self.route(grid, sent)
        replies = list(grid.send_and_receive(sent, timeout=timeout))
        if all(m.metadata.message_id for m in sent):
            self._sent = {m.metadata.message_id: addresses[id(m)] for m in sent}
            answered = {r.metadata.reply_to_message_id for r in replies}
            self._unanswered = [n for mid, n in self._sent.items() if mid not in answered]
            replies = self.readdressed(replies, self._sent)
        else:  # a grid that leaves message ids unset: match replies by their source (devices only)
            self._sent = {}
            sources = {r.metadata.src_node_id for r in replies}
            self._unanswered = [addresses[id(m)] for m in sent if m.metadata.dst_node_id not in sources]
        self._timeout = timeout
        return replies

    def _who(self, node: int) -> str:
        return f"client {self.node_to_client.get(node, '?')} (node {node})"

    def _split_replies(self, replies: Iterable[Message]) -> tuple[list[Message], list[str]]:
        """Good replies, and one line per client that failed: its error, or no reply at all."""
        ok, failures = [], []
        for msg in replies:
            if msg.has_error():
                node = self._sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
                failures.append(f"{self._who(node)}: {msg.error.reason}")
                log(WARNING, "%s failed: %s", self._who(node), msg.error.reason)
            else:
                ok.append(msg)
        for node in self._unanswered:
            reason = f"no reply within {self._timeout:g}s"
            failures.append(f"{self._who(node)}: {reason}")
            log(WARNING, "%s failed: %s", self._who(node), reason)
        self._sent, self._unanswered = {}, []
        return ok, failures

    def parse_update(self, msg: Message) -> ClientUpdate:
        """A training reply as a checked :class:`ClientUpdate` (raises :class:`UpdateError` & co.)."""
        node = msg.metadata.src_node_id
        cid = self.node_to_client.get(node, -1)
        metrics = dict(msg.content[METRICS])
        arrays = to_numpy(msg.content[ARRAYS]) if ARRAYS in msg.content.array_records else {}
        update = ClientUpdate(cid, node, arrays, int(metrics.get("num-examples", 0)), metrics)
        if int(metrics.get("client-id", cid)) != cid:
            raise UpdateError(f"node {node} answered as client {metrics.get('client-id')}, expected {cid}")
        self.check_update(update)
        return update

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok, failures = self._split_replies(replies)
        updates: list[ClientUpdate] = []
        rejected: dict[str, str] = {}
        per_client: dict[int, dict[str, float]] = {}
        for msg in ok:
            cid = self.node_to_client.get(msg.metadata.src_node_id, -1)
            try:
                update = self.parse_update(msg)
            except (UpdateError, KeyError, TypeError, ValueError) as err:
                rejected[str(cid)] = str(err)
                log(WARNING, "Rejected update of client %d (node %d): %s", cid, msg.metadata.src_node_id, err)
                continue
            updates.append(update)
            per_client[cid] = {k: v for k, v in update.metrics.items() if k not in ("client-id",)}
        if self.recorder is not None:
            self.recorder.record_train(server_round, per_client, rejected, failures)
        if not updates:
            reasons = failures + [f"client {c}: {r}" for c, r in rejected.items()]
            raise RoundFailedError(
                f"round {server_round}: no client produced an update; " + "; ".join(reasons[:3])
            )
        aggregated = self.aggregate_shared(server_round, updates, self._current)
        losses = [u.metrics.get("train-loss", float("nan")) for u in updates]
        return aggregated, MetricRecord(
            {"train-loss": float(np.nanmean(losses)), "num-clients": len(updates)}
        )

    def should_evaluate(self, server_round: int) -> bool:
        """Evaluated rounds: every ``eval_every``-th, the listed ``eval_full_rounds`` and the last."""
        return (
            server_round % self.eval_every == 0
            or server_round == self.num_rounds
            or server_round in self.eval_full_rounds
        )

    def is_full_evaluation(self, server_round: int) -> bool:
        """Whether every client is asked in ``server_round``: always by default (``eval_fraction``
        1); with a sampled evaluation, in the last round and the ``eval_full_rounds``."""
        return (
            self.eval_fraction >= 1
            or server_round == self.num_rounds
            or server_round in self.eval_full_rounds
        )

    def evaluation_sample(self, server_round: int, nodes: list[int]) -> list[int]:
        """The live ``nodes`` asked to evaluate in ``server_round``: all of them in a full
        evaluation, else ``round(eval_fraction * len(nodes))`` of them (at least
        ``eval_min_clients``), drawn with a generator seeded by the run's seed and the round only:
        independent of the training sample, the same clients for every method with that seed."""
        if self.is_full_evaluation(server_round):
            return list(nodes)
        size = min(len(nodes), max(self.eval_min_clients, round(self.eval_fraction * len(nodes))))
        rng = random.Random(f"fedvit-eval/{self.seed}/{server_round}")
        by_client = sorted(nodes, key=self.node_to_client.__getitem__)
        return sorted(rng.sample(by_client, size), key=self.node_to_client.__getitem__)

    def evaluation_protocol(self) -> dict[str, Any]:
        """What ``results.json`` ``evaluation`` states about the protocol."""
        sampled = self.eval_fraction < 1
        return {
            "mode": "sampled" if sampled else "full",
            "description": (
                f"a seeded sample of {100 * self.eval_fraction:g}% of the clients (at least "
                f"{self.eval_min_clients}) per evaluated round; every client in the last round and in "
                "full_rounds"
                if sampled
                else "every client in every evaluated round"
            ),
            "eval_every": self.eval_every,
            "fraction": self.eval_fraction,
            "min_clients": self.eval_min_clients,
            "full_rounds": sorted(self.eval_full_rounds),
            "last_round_full": True,
        }

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._eval_plan = None
        if not self.should_evaluate(server_round):
            return []
        live = self._live_nodes(grid)
        nodes = self.evaluation_sample(server_round, live)
        self._eval_plan = (server_round, len(nodes) < len(live), len(nodes), len(live))
        messages = []
        for node in nodes:
            cid = self.node_to_client[node]
            content = RecordDict(
                {
                    ARRAYS: self.client_arrays(server_round, cid, arrays),
                    CONFIG: self.client_config(server_round, cid, config),
                }
            )
            messages.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node))
        if len(nodes) < len(live):
            log(INFO, "configure_evaluate: %d of %d clients (sampled)", len(nodes), len(live))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        ok, failures = self._split_replies(replies)
        per_client: dict[int, dict[str, float]] = {}
        for msg in ok:
            metrics = dict(msg.content[METRICS])
            cid = int(metrics.pop("client-id", self.node_to_client.get(msg.metadata.src_node_id, -1)))
            per_client[cid] = self.client_eval_metrics(cid, metrics)
        if not per_client or self.recorder is None:
            return None
        plan = self._eval_plan if self._eval_plan is not None and self._eval_plan[0] == server_round else None
        sampled, asked, total = (plan[1], plan[2], plan[3]) if plan is not None else (False, None, None)
        self.recorder.set_evaluation(self.evaluation_protocol())  # the current one, also after a resume
        ev = self.recorder.record_eval(
            server_round, per_client, failures, sampled=sampled, clients_asked=asked, clients_total=total
        )
        t = ev["test_acc"]
        return MetricRecord(
            {
                "test-acc-mean": t.get("mean", float("nan")),
                "test-acc-weighted": t.get("weighted_mean", float("nan")),
                "test-acc-std": t.get("std", float("nan")),
                "val-acc-mean": ev["val_acc"].get("mean", float("nan")),
                "num-clients": len(per_client),
                "num-clients-total": int(ev["clients_total"]),
                "sampled": int(sampled),
            }
        )

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        """Atomically replace ``checkpoint/`` with the state after ``server_round``."""
        if self.checkpoint_dir is None:
            return
        tmp = self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.savez(tmp / "arrays.npz", **to_numpy(arrays))
        extra_arrays, extra_state = self.state_dict()
        np.savez(tmp / "strategy.npz", **extra_arrays)
        state = {
            "round": server_round,
            "run_name": self.run_name,
            "run_key": self.run_key,
            "strategy": type(self).__name__,
            "state": extra_state,
        }
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
        old = self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.checkpoint_dir.exists():
            self.checkpoint_dir.rename(old)
        tmp.rename(self.checkpoint_dir)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, checkpoint_dir: Path) -> tuple[int, ArrayRecord]:
        """Restore the state saved by :meth:`save_checkpoint`; returns (round, shared arrays)."""
        state_path = checkpoint_dir / "state.json"
        if not state_path.is_file():
            raise FileNotFoundError(f"server.resume: no checkpoint in {checkpoint_dir} (missing state.json)")
        state = json.loads(state_path.read_text())
        self.run_key = state.get("run_key", self.run_key)
        if state.get("strategy") != type(self).__name__:
            raise ValueError(
                f"server.resume: checkpoint of {state.get('strategy')}, this run uses {type(self).__name__}"
            )
        with np.load(checkpoint_dir / "arrays.npz") as z:
            arrays = {k: z[k] for k in z.files}
        check_arrays(arrays, self.shared_shapes, who=f"checkpoint {checkpoint_dir}")
        with np.load(checkpoint_dir / "strategy.npz") as z:
            extra = {k: z[k] for k in z.files}
        self.load_state_dict(extra, state.get("state", {}))
        return int(state["round"]), to_record(arrays)

    # ------------------------------------------------------------------ the loop

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Any = None,
        start_round: int = 1,
    ) -> Result:
        """Run rounds ``start_round..num_rounds`` (``start_round > 1`` when resuming)."""
        self.num_rounds = num_rounds
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result = Result()
        arrays = initial_arrays
        self.summary()
        if self.recorder is not None:
            self.recorder.data["run_key"] = self.run_key
        self.discover(grid, timeout)
        for rnd in range(start_round, num_rounds + 1):
            t0 = time.time()
            self.discover(grid, timeout)  # nodes that joined since
            self._current = arrays
            replies = self.exchange(grid, self.configure_train(rnd, arrays, train_config, grid), timeout)
            new_arrays, train_metrics = self.aggregate_train(rnd, replies)
            if new_arrays is not None:
                arrays = new_arrays
                result.arrays = arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[rnd] = train_metrics
            eval_metrics = self.finish_round(rnd, arrays, evaluate_config, grid, timeout, result)
            self._progress(rnd, train_metrics, eval_metrics, time.time() - t0)
        result.arrays = arrays
        return result

    def finish_round(
        self,
        rnd: int,
        arrays: ArrayRecord,
        evaluate_config: ConfigRecord,
        grid: Grid,
        timeout: float,
        result: Result,
    ) -> MetricRecord | None:
        """Evaluate (when due), close the round in the results and checkpoint."""
        eval_metrics = None
        eval_messages = list(self.configure_evaluate(rnd, arrays, evaluate_config, grid))
        if eval_messages:
            replies = self.exchange(grid, eval_messages, timeout)
            eval_metrics = self.aggregate_evaluate(rnd, replies)
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[rnd] = eval_metrics
        if self.recorder is not None:
            self.recorder.end_round(rnd)
        self.save_checkpoint(rnd, arrays)
        return eval_metrics

    def _progress(
        self, rnd: int, train: MetricRecord | None, ev: MetricRecord | None, seconds: float
    ) -> None:
        parts = [f"round {rnd}/{self.num_rounds}", f"{seconds:.1f}s"]
        if train is not None:
            parts.append(f"train loss {train['train-loss']:.4f} ({int(train['num-clients'])} clients)")
        if ev is not None:
            parts.append(
                f"test acc {ev['test-acc-mean']:.4f} ± {ev['test-acc-std']:.4f} "
                f"(weighted {ev['test-acc-weighted']:.4f}), val acc {ev['val-acc-mean']:.4f}"
            )
            if "sampled" in ev and int(ev["sampled"]):
                parts[-1] += f" (sampled {int(ev['num-clients'])}/{int(ev['num-clients-total'])})"
        log(INFO, "[fedvit] %s", " | ".join(parts))
