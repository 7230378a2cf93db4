"""Private state persists on disk (always) and in context.state (when small)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict

from fedvit.state import CONTEXT_KEY, PrivateStore, StateError

SHAPES = {"head.weight": (3, 4), "head.bias": (3,)}


def arrays(value: float = 1.0) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, np.float32) for k, s in SHAPES.items()}


def test_nothing_saved_yet_loads_none(tmp_path: Path) -> None:
    assert PrivateStore(tmp_path / "s", "fp").load(SHAPES) is None


def test_round_trip_through_disk_and_context(tmp_path: Path) -> None:
    state = RecordDict()
    store = PrivateStore(tmp_path / "s", "fp", context_state=state)
    store.save(arrays(2.0))
    assert CONTEXT_KEY in state
    assert (tmp_path / "s" / "private.npz").is_file()
    fresh = PrivateStore(tmp_path / "s", "fp")  # a restarted SuperNode: no context.state
    np.testing.assert_array_equal(fresh.load(SHAPES)["head.weight"], np.full((3, 4), 2.0))


def test_large_state_stays_out_of_context_state(tmp_path: Path) -> None:
    state = RecordDict()
    store = PrivateStore(tmp_path / "s", "fp", context_state=state, context_max_bytes=8)
    store.save(arrays())
    assert CONTEXT_KEY not in state
    np.testing.assert_array_equal(store.load(SHAPES)["head.bias"], np.ones(3))


def test_state_of_another_model_or_method_is_refused(tmp_path: Path) -> None:
    PrivateStore(tmp_path / "s", "fp-a").save(arrays())
    with pytest.raises(StateError, match="another model or method"):
        PrivateStore(tmp_path / "s", "fp-b").load(SHAPES)


def test_corrupt_state_file_gives_one_clear_error(tmp_path: Path) -> None:
    PrivateStore(tmp_path / "s", "fp").save(arrays())
    (tmp_path / "s" / "private.npz").write_bytes(b"garbage")
    with pytest.raises(StateError, match=r"private\.npz"):
        PrivateStore(tmp_path / "s", "fp").load(SHAPES)


def test_a_failed_write_leaves_the_previous_state(tmp_path: Path) -> None:
    store = PrivateStore(tmp_path / "s", "fp")
    store.save(arrays(1.0))
    with pytest.raises(StateError, match=r"head\.weight"):
        store.save({"head.weight": object()})  # type: ignore[dict-item]
    np.testing.assert_array_equal(store.load(SHAPES)["head.weight"], np.ones((3, 4)))
    assert [p.name for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")] == []
