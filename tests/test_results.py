"""A run's files (fedvit.results): each rewrite replaces the file whole, readable by its owner alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedvit.results import RunRecorder, atomic_write_text

RUN_FILES = ("results.json", "metrics.csv", "clients.csv")


def test_every_write_replaces_the_run_files_whole_with_owner_only_permissions(tmp_path: Path) -> None:
    run_dir = tmp_path / "outputs" / "run"  # created by the first write
    rec = RunRecorder(run_dir, {"method": "m", "dataset": "d", "run_name": "run"}, plots=False)
    rec.write()
    inodes = {name: (run_dir / name).stat().st_ino for name in RUN_FILES}
    rec.data["status"] = "completed"
    rec.write()
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"
    for name in RUN_FILES:
        st = (run_dir / name).stat()
        assert st.st_ino != inodes[name], f"{name} was written into, not replaced"
        assert st.st_mode & 0o777 == 0o600, name
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(RUN_FILES)  # no temporary file left


def test_atomic_write_text_keeps_the_old_file_when_the_text_cannot_be_written(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write_text(path, "old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "\ud800")  # a lone surrogate: not encodable as UTF-8
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
