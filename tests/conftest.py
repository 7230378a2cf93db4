"""Shared fixtures: isolate every test's caches and state directories."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from tinyapp import MARK, write_tiny_app

SHARED_DATA = Path(
    os.environ.get("FEDVIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


@pytest.fixture(autouse=True)
def _isolated_dirs(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Client state outside a run directory goes to a per-test directory; ``FEDVIT_TEST_ROOT`` names
    the test's own tmp_path (where its runs write their run directories and, in simulation, the
    clients' state: ``fedhelpers.stored_private`` looks in both)."""
    monkeypatch.setenv("FEDVIT_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    monkeypatch.setenv("FEDVIT_TEST_ROOT", str(tmp_path))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The staged real datasets (``../shared/data``); skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"staged data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def mark(monkeypatch: pytest.MonkeyPatch) -> str:
    """A tag in this process's environment: every process a test starts inherits it."""
    value = uuid.uuid4().hex
    monkeypatch.setenv(MARK, value)
    return value


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A numpy-only Flower app written to a temporary directory (see tests/tinyapp.py)."""
    return write_tiny_app(tmp_path_factory.mktemp("apps"))


class Replies(list):
    """(message type, client id, reply) of every ClientApp reply; ``train``: (client id, reply)
    of the training replies."""

    def __init__(self) -> None:
        super().__init__()
        self.train: list = []


def client_of(message, context) -> int:
    """The client a message is for: the one it names (a simulated node serves any client), else
    the node's own (a device, or a query)."""
    config = message.content.config_records.get("config", {})
    node = context.node_config
    return int(config.get("client-id", node.get("client-id", node["partition-id"])))


@pytest.fixture
def capture_replies(monkeypatch: pytest.MonkeyPatch) -> Replies:
    """Record every reply the fedvit ClientApp returns (in-process federations)."""
    from fedvit import client_app

    replies = Replies()
    original = client_app.app.__call__

    def spy(self, message, context):
        reply = original(message, context)
        kind, cid = message.metadata.message_type, client_of(message, context)
        replies.append((kind, cid, reply))
        if kind == "train":
            replies.train.append((cid, reply))
        return reply

    monkeypatch.setattr(type(client_app.app), "__call__", spy)
    return replies


@pytest.fixture
def train_replies(capture_replies: Replies) -> list:
    """(client id, reply) of every training reply."""
    return capture_replies.train


class Received(list):
    """(kind, client id, arrays) of every training and evaluation a client is asked for, in the
    order it does them (a pipelined ``train`` message: its evaluation, then its training);
    ``evaluations``: (server round, client id) of each evaluation."""

    def __init__(self) -> None:
        super().__init__()
        self.evaluations: list[tuple[int, int]] = []


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> Received:
    """Every training and evaluation the ClientApp is asked for (in-process), see :class:`Received`."""
    from fedvit import client_app
    from fedvit.wire import EVAL_ARRAYS, EVAL_CONFIG

    seen = Received()
    original = client_app.app.__call__

    def numpy_of(record) -> dict[str, Any]:
        return {k: v.numpy() for k, v in record.items()}

    def spy(self, message, context):
        kind, content, cid = message.metadata.message_type, message.content, client_of(message, context)
        if kind == "train" and EVAL_CONFIG in content.config_records:
            record = content.array_records.get(EVAL_ARRAYS, content.array_records["arrays"])
            seen.append(("evaluate", cid, numpy_of(record)))
            seen.evaluations.append((int(content[EVAL_CONFIG]["server-round"]), cid))
        if kind in ("train", "evaluate"):
            seen.append((kind, cid, numpy_of(content.array_records["arrays"])))
            if kind == "evaluate":
                seen.evaluations.append((int(content["config"]["server-round"]), cid))
        return original(message, context)

    monkeypatch.setattr(type(client_app.app), "__call__", spy)
    return seen
