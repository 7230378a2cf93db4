"""Atomic writes (fedvit.io): the destination holds the old content or the new, never a part; no
temporary file is left behind; permissions and exact names as asked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fedvit import io


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_each_format_round_trips(tmp_path: Path) -> None:
    import torch

    io.write_bytes(tmp_path / "a.bin", b"\x00\x01")
    io.write_text(tmp_path / "sub" / "b.txt", "héllo")  # missing folders are made
    io.write_json(tmp_path / "c.json", {"x": [1, 2]}, indent=2, end="\n")
    io.write_npz(tmp_path / "d.arrays", {"w": np.arange(3)})  # no ".npz" appended
    io.torch_save(tmp_path / "e.pt", {"t": torch.ones(2)})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "c.json").read_text() == json.dumps({"x": [1, 2]}, indent=2) + "\n"
    with np.load(tmp_path / "d.arrays") as z:
        np.testing.assert_array_equal(z["w"], np.arange(3))
    assert torch.equal(torch.load(tmp_path / "e.pt")["t"], torch.ones(2))
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "sub") == []


def test_replaces_the_file_instead_of_writing_into_it(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    io.write_text(path, "old")
    with path.open() as reader:  # a reader of the old file keeps reading the old file
        io.write_text(path, "new")
        assert reader.read() == "old"
    assert path.read_text() == "new"


def test_a_failing_writer_leaves_the_old_content_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    io.write_json(path, {"v": 1})

    def half(f) -> None:
        f.write(b'{"v": ')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.atomic_write(path, half)
    assert json.loads(path.read_text()) == {"v": 1}
    assert leftovers(tmp_path) == []


def test_mode_sets_the_permission_bits(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        io.write_text(tmp_path / "private", "x", mode=0o600)
        io.write_text(tmp_path / "public", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "public").stat().st_mode & 0o777 == 0o644


def test_durable_writes_fsync_before_the_rename_and_others_do_not(tmp_path: Path, monkeypatch) -> None:
    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((tmp_path / "f.txt").exists())  # the destination not yet replaced by this write
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    io.write_text(tmp_path / "f.txt", "a")
    assert synced == [False]
    io.write_text(tmp_path / "f.txt", "b", durable=False)
    assert synced == [False] and (tmp_path / "f.txt").read_text() == "b"
