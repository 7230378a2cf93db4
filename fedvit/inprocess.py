"""An in-process federation: the real ServerApp logic and ClientApp handlers, no Ray.

:class:`InProcessGrid` implements the part of Flower's ``Grid`` that strategies use
(``get_node_ids``, ``send_and_receive``, ``push_messages`` / ``pull_messages``) by calling
the ClientApp directly, with one ``Context`` per node that persists across rounds exactly
like a SuperNode's. A handler that raises becomes an error reply, as in Flower.

Asynchronous servers push and pull: here a pushed message is handled at once, and its reply
becomes pullable on a **virtual clock** after ``slowdown × num-steps`` time units (the
``slowdown`` the server put in the message config, default 1; ``num-steps`` from the reply's
metrics), so client speeds and the staleness they cause are deterministic in tests. Nodes get
``virtual-time = true`` in their node config, which tells the ClientApp not to sleep for its
simulated slowdown. It is what the fast tests use to
exercise whole rounds, and a debugging aid (step through a client in one process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

ClientFn = Callable[[Message, Context], Message]


class InProcessGrid:
    """A Grid whose nodes are ClientApp calls in this process."""

    def __init__(
        self,
        run_config: Mapping[str, Any],
        num_nodes: int,
        client_app: ClientFn | None = None,
        node_configs: list[dict[str, Any]] | None = None,
        first_node_id: int = 1001,
    ) -> None:
        # Messages created in this process need the identity a ServerApp process has.
        for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
            if getattr(TaskIdentity, attr) is None:
                setattr(TaskIdentity, attr, value)
        if client_app is None:
            from fedvit.client_app import app as client_app
        self.client_app = client_app
        self.contexts: dict[int, Context] = {}
        for i in range(num_nodes):
            node_id = first_node_id + 7 * i  # not equal to the client id, as in Flower
            node_config = {"partition-id": i, "num-partitions": num_nodes, "virtual-time": True}
            if node_configs is not None:
                node_config.update(node_configs[i])
            self.contexts[node_id] = Context(
                run_id=1,
                node_id=node_id,
                node_config=node_config,
                state=RecordDict(),
                run_config=dict(run_config),
            )
        self.offline: set[int] = set()
        self.sent: list[Message] = []
        self.clock = 0.0  # virtual time of push / pull
        self._pending: dict[str, tuple[float, Message]] = {}  # message id -> (ready at, reply)
        self._next_id = 0

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def _handle(self, msg: Message, message_id: str | None = None) -> Message | None:
        if not msg.metadata.message_id:  # as Flower's grid does when it sends a message
            self._next_id += 1
            msg.metadata.__dict__["_message_id"] = message_id or f"inprocess-{self._next_id}"
        self.sent.append(msg)
        node = msg.metadata.dst_node_id
        if node in self.offline or node not in self.contexts:
            return None  # an unreachable node sends nothing back, like a timeout
        try:
            return self.client_app(msg, self.contexts[node])
        except Exception as err:
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return [r for r in (self._handle(m) for m in messages) if r is not None]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Handle each message now; its reply is pullable at ``clock + slowdown × num-steps``."""
        ids = []
        for msg in messages:
            self._next_id += 1
            mid = f"inprocess-{self._next_id}"
            reply = self._handle(msg, mid)
            ids.append(mid)
            if reply is None:
                continue
            config = msg.content.config_records.get("config", {})
            steps = 1.0
            if not reply.has_error() and "metrics" in reply.content.metric_records:
                steps = float(reply.content["metrics"].get("num-steps", 1) or 1)
            self._pending[mid] = (self.clock + float(config.get("slowdown", 1.0)) * max(steps, 1.0), reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Replies ready on the virtual clock; if none is, advance the clock to the next one."""
        wanted = [m for m in message_ids if m in self._pending]
        if not wanted:
            return []
        ready = [m for m in wanted if self._pending[m][0] <= self.clock]
        if not ready:
            self.clock = min(self._pending[m][0] for m in wanted)
            ready = [m for m in wanted if self._pending[m][0] <= self.clock]
        ready.sort(key=lambda m: (self._pending[m][0], int(m.rsplit("-", 1)[1])))
        return [self._pending.pop(m)[1] for m in ready]
