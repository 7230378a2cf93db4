"""Private state persists on disk (always) and in context.state (when small); the store alone knows
the state directory's layout (a device's per-(method, model, dataset) folder, the fingerprint)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict

from fedvit.state import CONTEXT_KEY, PrivateStore, StateError, store_fingerprint, store_subdir

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


def test_files_are_written_for_the_owner_alone(tmp_path: Path) -> None:
    PrivateStore(tmp_path / "s", "fp").save(arrays())
    for name in ("private.npz", "meta.json"):
        assert (tmp_path / "s" / name).stat().st_mode & 0o777 == 0o600


def test_context_state_holds_the_arrays_bit_for_bit(tmp_path: Path) -> None:
    state = RecordDict()
    saved = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([7], np.int64)}
    PrivateStore(tmp_path / "s", "fp", context_state=state).save(saved)
    (tmp_path / "s" / "private.npz").unlink()  # what load returns now can only come from context.state
    loaded = PrivateStore(tmp_path / "s", "fp", context_state=state).load({"a": (2, 3), "b": (1,)})
    assert loaded is not None
    for k, v in saved.items():
        assert loaded[k].dtype == v.dtype and loaded[k].tobytes() == v.tobytes()


@pytest.fixture(scope="module")
def cfg():
    from fedvit.config import load_config

    return load_config({"method": "fedper", "dataset": "digits", "model": "vit-tiny"})


def test_store_layout_names(cfg) -> None:
    assert store_subdir(cfg) == "fedper-vit-tiny-digits"
    fp = store_fingerprint(cfg, SHAPES)
    assert fp == store_fingerprint(cfg, dict(SHAPES))
    assert fp != store_fingerprint(cfg, {"head.weight": (3, 4)})


def test_locate_finds_a_store_or_a_devices_subdirectory(cfg, tmp_path: Path) -> None:
    PrivateStore(tmp_path / "own", "fp").save(arrays(1.0))
    PrivateStore(tmp_path / "device" / store_subdir(cfg), "fp").save(arrays(2.0))
    assert PrivateStore.locate(tmp_path / "own", cfg, "fp").state_dir == tmp_path / "own"
    found = PrivateStore.locate(tmp_path / "device", cfg, "fp")
    assert found.state_dir == tmp_path / "device" / store_subdir(cfg)
    np.testing.assert_array_equal(found.read()["head.bias"], np.full(3, 2.0))
    with pytest.raises(StateError, match=r"no private\.npz in .*empty or .*fedper-vit-tiny-digits"):
        PrivateStore.locate(tmp_path / "empty", cfg, "fp")


def test_read_checks_the_fingerprint_but_not_the_shapes(tmp_path: Path) -> None:
    PrivateStore(tmp_path / "s", "fp").save({"x": np.zeros((2, 2), np.float32)})
    assert set(PrivateStore(tmp_path / "s", "fp").read()) == {"x"}
    with pytest.raises(StateError, match="another model or method"):
        PrivateStore(tmp_path / "s", "other").read()
    (tmp_path / "s" / "meta.json").unlink()  # a save cut between its two files: the arrays still count
    assert set(PrivateStore(tmp_path / "s", "other").read()) == {"x"}
    with pytest.raises(StateError, match=r"no private\.npz"):
        PrivateStore(tmp_path / "nothing", "fp").read()
