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


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, dict[str, Any]]]:
    """Every train/evaluate message the ClientApp receives (in-process): (kind, client id, arrays)."""
    from fedvit import client_app

    seen: list[tuple[str, int, dict[str, Any]]] = []
    original = client_app.app.__call__

    def spy(self, message, context):
        kind = message.metadata.message_type
        if kind in ("train", "evaluate"):
            arrays = {k: v.numpy() for k, v in message.content.array_records["arrays"].items()}
            seen.append((kind, client_of(message, context), arrays))
        return original(message, context)

    monkeypatch.setattr(type(client_app.app), "__call__", spy)
    return seen
