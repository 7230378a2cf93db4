"""Who is where, and how a message reaches its client: the server's view of the federation.

What crosses the wire here:

* ``query`` (once, and for nodes that join later): config {``run-name``, ``run-key``}. A device
  (a node with a node config of its own) replies with its ``client-id``, its split sizes, label
  histograms and what its method's client adds; a *virtual worker* (a simulated node with only
  Flower's node config) replies ``virtual-worker`` = 1: it serves any client. Every client
  without a device then becomes a *virtual client* at :func:`virtual_address`, and one query
  per worker with ``describe-clients`` = [ids] describes a share of them.
* Every later message of a round goes to its client's address; :meth:`Federation.route` sends a
  virtual client's message to a live worker, and replies are re-addressed to the client
  (:meth:`Federation.readdress`), so everything after an exchange sees clients, as with devices.

:class:`Federation` is the strategies' base: it holds only the federation's standing state
(``node_to_client``, ``worker_place``, ``client_info``); a round's data travels as values
(:class:`~strategies.rounds.Replies`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedvit.results import RunRecorder
from fedvit.wire import DESCRIBE, EVAL_CONFIG, VIRTUAL_WORKER, unpack_client_info
from strategies.rounds import CONFIG, METRICS, Replies, RoundFailedError

#: A trained example's cost in evaluated ones, for ordering an exchange that holds both (forward,
#: backward and step against a forward: 1.147 / 0.372 ms per image for the tiny ViT of
#: docs/experiments.md, issue 14).
TRAIN_EXAMPLE_COST = 3.0


def virtual_address(client_id: int) -> int:
    """The address of a virtual client (negative: never a Flower node id)."""
    return -(client_id + 1)


class Federation:
    """Client identity (node -> client), virtual clients on simulated workers, message routing
    and the exchanges of a round."""

    def __init__(
        self, *, num_clients: int, min_available_nodes: int, run_name: str, recorder: RunRecorder | None
    ) -> None:
        self.num_clients = num_clients
        self.min_available_nodes = min_available_nodes
        self.run_name = run_name
        # Unique per run (kept on resume): clients key their default state directory by it, so a
        # new run never picks up the private state of an earlier run with the same name.
        self.run_key = f"{run_name}-{uuid.uuid4().hex[:8]}"
        self.recorder = recorder
        self.node_to_client: dict[int, int] = {}  # address (a device's node, or virtual_address) -> client
        # simulated node that serves virtual clients -> its place among the simulated nodes (1-based)
        self.worker_place: dict[int, int] = {}
        self.client_info: dict[int, dict[str, Any]] = {}

    @property
    def workers(self) -> list[int]:
        """The simulated nodes that serve virtual clients, in their place's order (the order
        Flower's simulation queues their messages in, see :meth:`route`)."""
        return sorted(self.worker_place, key=self.worker_place.__getitem__)

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
            new = [n for n in nodes if n not in self.node_to_client and n not in self.worker_place]
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
                self.worker_place[node] = int(metrics[VIRTUAL_WORKER])
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

    # ------------------------------------------------------------------ routing and exchanges

    def message_cost(self, msg: Message) -> float:
        """Expected work of a message, for scheduling, in evaluated examples: the client's
        validation and test examples for ``evaluate``; for ``train`` its training examples, each
        :data:`TRAIN_EXAMPLE_COST` evaluated ones, plus its evaluation when a pipelined message
        carries one (1 when unknown)."""
        info = self.client_info.get(self.node_to_client.get(msg.metadata.dst_node_id, -1), {})
        evaluation = float((info.get("num_val", 0) or 0) + (info.get("num_test", 0) or 0))
        if msg.metadata.message_type != MessageType.TRAIN:
            return evaluation or 1.0
        carried = evaluation if EVAL_CONFIG in msg.content.config_records else 0.0
        return TRAIN_EXAMPLE_COST * float(info.get("num_train", 1) or 1) + carried

    def route(self, grid: Grid, messages: list[Message]) -> dict[int, int]:
        """Send each virtual client's message to a live worker; returns ``id(message) -> address``.

        Flower's simulation hands a node's messages to its workers one per node per pass, in the
        order the nodes were created, whatever order they were sent in. So the messages are sorted
        by :meth:`message_cost` (largest first) and dealt round-robin over the workers in that
        order (each worker's place, from its query reply): the k-th pass carries the k-th largest
        band, largest first, and no core idles at the end of a round behind one large client
        that started last (longest-processing-time-first)."""
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

    def exchange(self, grid: Grid, messages: Iterable[Message], timeout: float) -> Replies:
        """``grid.send_and_receive`` with routing (:meth:`route`): every reply is seen from its
        client's address, and every client that failed is named, also for an error the SuperLink
        wrote itself (a lost node's "Node Unavailable" comes from node 0) and for a message that
        was never answered."""
        sent = list(messages)
        addresses = self.route(grid, sent)
        replies = list(grid.send_and_receive(sent, timeout=timeout))
        by_id: dict[str, int] = {}
        if all(m.metadata.message_id for m in sent):
            by_id = {m.metadata.message_id: addresses[id(m)] for m in sent}
            answered = {r.metadata.reply_to_message_id for r in replies}
            unanswered = [n for mid, n in by_id.items() if mid not in answered]
            replies = self.readdressed(replies, by_id)
        else:  # a grid that leaves message ids unset: match replies by their source (devices only)
            sources = {r.metadata.src_node_id for r in replies}
            unanswered = [addresses[id(m)] for m in sent if m.metadata.dst_node_id not in sources]
        out = Replies([], [])
        for msg in replies:
            if msg.has_error():
                self._failed(
                    by_id.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id),
                    msg.error.reason,
                    out,
                )
            else:
                out.ok.append(msg)
        for node in unanswered:
            self._failed(node, f"no reply within {timeout:g}s", out)
        return out

    def who(self, node: int) -> str:
        """How a log line or failure names the client at address ``node``."""
        return f"client {self.node_to_client.get(node, '?')} (node {node})"

    def _failed(self, node: int, reason: str, replies: Replies) -> None:
        who = self.who(node)
        replies.failures.append(f"{who}: {reason}")
        replies.failed.append(node)
        log(WARNING, "%s failed: %s", who, reason)
