"""The behaviour check (scripts/behaviour_check.py): every method's numbers on a tiny federation,
compared bit for bit with tests/data/behaviour-baseline.json (made before the issue 17 refactoring)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "behaviour_check.py"
BASELINE = ROOT / "tests" / "data" / "behaviour-baseline.json"


def load_script():
    spec = importlib.util.spec_from_file_location("behaviour_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )


def test_the_baseline_covers_every_registered_method_with_the_scripts_settings() -> None:
    script, baseline = load_script(), json.loads(BASELINE.read_text())
    assert sorted(baseline["methods"]) == script.methods()
    assert baseline["settings"] == json.loads(json.dumps(script.settings()))
    assert len(baseline["commit"]) == 40 and baseline["uncommitted"] == []
    for name, entry in baseline["methods"].items():
        assert [r["round"] for r in entry["rounds"]] == [1, 2], name
        assert all(len(r["test-acc"]) == 3 for r in entry["rounds"]), name


def test_compare_names_exactly_the_methods_whose_numbers_moved_by_one_ulp() -> None:
    script, baseline = load_script(), json.loads(BASELINE.read_text())
    assert script.compare(baseline, baseline) == []
    current = copy.deepcopy(baseline)
    loss = current["methods"]["fedrep"]["rounds"][1]["train-loss"]
    loss["2"] = float(np.nextafter(loss["2"], np.inf))  # the smallest possible change
    current["methods"]["pfedla"]["checkpoint_sha256"] = "0" * 64
    current["methods"]["new-method"] = current["methods"]["fedavg"]
    problems = script.compare(baseline, current)
    assert problems == [
        "fedrep: differs (round 2 train-loss)",
        "pfedla: differs (checkpoint)",
        "new-method: not in the baseline",
    ]
    changed = copy.deepcopy(baseline)
    changed["settings"]["rounds"] = 3
    assert script.compare(changed, baseline)[0].startswith("settings differ")


@pytest.mark.slow
def test_a_subset_reproduces_the_baseline_and_the_exit_status_names_what_moved(tmp_path: Path) -> None:
    script = load_script()
    tampered = json.loads(BASELINE.read_text())
    acc = tampered["methods"]["fedper"]["rounds"][0]["test-acc"]
    acc["0"] = float(np.nextafter(acc["0"], -np.inf))
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    out = tmp_path / "now.json"
    result = check(
        "--methods", "fedper", "fedrep", "--out", str(out), "--compare", str(tmp_path / "tampered.json")
    )
    assert result.returncode == 1, result.stderr[-3000:]
    named = [line for line in result.stderr.splitlines() if "differs" in line]
    assert named == ["[behaviour] fedper: differs (round 1 test-acc)"]
    now = json.loads(out.read_text())
    assert sorted(now["methods"]) == ["fedper", "fedrep"]
    assert script.compare(json.loads(BASELINE.read_text()), now) == []  # without the other methods first


@pytest.mark.slow
def test_every_method_is_bit_identical_to_the_baseline() -> None:
    result = check("--compare", str(BASELINE))
    assert result.returncode == 0, "\n".join(
        line for line in result.stderr.splitlines() if line.startswith("[behaviour]")
    )
