"""An in-process federation: the real ServerApp logic and ClientApp handlers, no Ray.

:class:`InProcessGrid` implements the part of Flower's ``Grid`` that strategies use
(``get_node_ids``, ``send_and_receive``) by calling the ClientApp directly, with one
``Context`` per node that persists across rounds exactly like a SuperNode's. A handler
that raises becomes an error reply, as in Flower. It is what the fast tests use to
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
            node_config = {"partition-id": i, "num-partitions": num_nodes}
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

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.offline or node not in self.contexts:
                continue  # an unreachable node sends nothing back, like a timeout
            try:
                replies.append(self.client_app(msg, self.contexts[node]))
            except Exception as err:
                replies.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg))
        return replies
