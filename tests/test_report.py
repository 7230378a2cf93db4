"""`fedvit report`: finished runs -> one table, resources relative to FedAvg."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedvit.report import ReportError, collect, to_csv, to_markdown


def fake_run(root: Path, method: str, acc: float, stored: int, sent: int, flops: int) -> Path:
    run_dir = root / method
    run_dir.mkdir(parents=True)
    stats = {
        "n": 4,
        "mean": acc,
        "std": 0.05,
        "weighted_mean": acc - 0.01,
        "q10": acc - 0.1,
        "q90": acc + 0.1,
    }
    picked = {"round": 10, "test_acc": stats}
    data = {
        "run_name": method,
        "method": method,
        "dataset": "organamnist",
        "status": "completed",
        "resources": {
            "params_model": 1000,
            "params_stored_per_client": stored,
            "params_private_per_client": stored - sent,
            "params_sent_up_per_round": sent,
            "flops_per_sample": flops,
        },
        "summary": {"last_round": picked, "best_val_round": {**picked, "round": 8}},
    }
    (run_dir / "results.json").write_text(json.dumps(data))
    return run_dir


def test_rows_are_relative_to_fedavg_on_the_same_dataset(tmp_path: Path) -> None:
    runs = [
        fake_run(tmp_path, "fedavg", 0.6, 1000, 1000, 500),
        fake_run(tmp_path, "fedper", 0.8, 1000, 900, 500),
    ]
    rows = collect(runs)
    fedper = rows[1]
    assert fedper["acc_mean"] == 0.8 and fedper["round"] == 10
    assert fedper["storage_pct"] == pytest.approx(100.0)
    assert fedper["comm_pct"] == pytest.approx(90.0)
    assert fedper["compute_pct"] == pytest.approx(100.0)
    md = to_markdown(rows)
    assert "| fedper | organamnist | 10 | 80.00 ± 5.00 | 79.00 |" in md
    assert "900 (90.0%)" in md
    assert to_csv(rows).splitlines()[0].startswith("run,method,dataset")


def test_best_val_selection_reports_the_round_picked_on_validation(tmp_path: Path) -> None:
    rows = collect([fake_run(tmp_path, "fedavg", 0.6, 1000, 1000, 500)], select="best-val")
    assert rows[0]["round"] == 8


def test_a_directory_without_results_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"no results\.json"):
        collect([tmp_path])


def test_the_cli_prints_the_table_and_writes_csv(tmp_path: Path, capsys) -> None:
    from fedvit.cli import main

    runs = [str(fake_run(tmp_path, m, 0.7, 1000, 1000, 500)) for m in ("fedavg", "local")]
    assert main(["report", *runs, "--csv", str(tmp_path / "t.csv")]) == 0
    assert "| local | organamnist |" in capsys.readouterr().out
    assert (tmp_path / "t.csv").read_text().count("\n") == 3
    assert main(["report", str(tmp_path / "missing")]) == 2
