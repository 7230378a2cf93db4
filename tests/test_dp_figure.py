"""scripts/dp_figure.py: accuracy against the ε each run reports, one line per method, the run
without DP at the right edge."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "dp_figure.py"
_spec = importlib.util.spec_from_file_location("dp_figure", SCRIPT)
dp_figure = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dp_figure)  # type: ignore[union-attr]


def fake(
    root: Path, name: str, method: str, acc: float, eps: float | None, status: str = "completed"
) -> None:
    privacy = {"epsilon": eps, "clients": 4, "clipped": 4, "noise_std": 0.1} if eps is not None else None
    last = {"round": 3, "train": {"privacy": privacy} if privacy else {}}
    data = {
        "method": method,
        "status": status,
        "rounds": [{"round": 1}, last],
        "summary": {"last_round": {"test_acc": {"mean": acc, "std": 0.05}}},
    }
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(data))


def test_points_are_the_reported_epsilons_sorted_with_no_dp_last_and_unfinished_runs_left_out(
    tmp_path: Path,
) -> None:
    fake(tmp_path, "no-dp,fedper", "fedper", 0.8, None)
    fake(tmp_path, "eps8,fedper", "fedper", 0.6, 7.98)
    fake(tmp_path, "eps1,fedper", "fedper", 0.4, 0.99)
    fake(tmp_path, "eps3,fedper", "fedper", 0.5, 2.9, status="running")
    fake(tmp_path, "eps1,fedavg", "fedavg", 0.1, 1.0)
    pts = dp_figure.points(tmp_path)
    assert [(e, round(m, 6)) for e, m, _ in pts["fedper"]] == [(0.99, 40.0), (7.98, 60.0), (None, 80.0)]
    assert [e for e, _, _ in pts["fedavg"]] == [1.0]


def test_the_figure_is_written_headless(tmp_path: Path, capsys) -> None:
    fake(tmp_path, "no-dp,fedper", "fedper", 0.8, None)
    fake(tmp_path, "eps1,fedper", "fedper", 0.4, 1.0)
    assert dp_figure.main([str(tmp_path), "-o", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").stat().st_size > 0
    assert "fedper: ε 1.00: 40.00 ± 5.00, no DP: 80.00 ± 5.00" in capsys.readouterr().out
