"""scripts/participation_gap.py (issue 16): two methods' runs of one seed, paired per client, and
their accuracy difference against the number of rounds each client trained in."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "participation_gap.py"
_spec = importlib.util.spec_from_file_location("participation_gap", SCRIPT)
gap = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gap  # its dataclass looks its module up there
_spec.loader.exec_module(gap)  # type: ignore[union-attr]

# 8 clients over 4 rounds: client i trained in TRAINED[i] rounds (0, 1, 1, 2, 2, 3, 3, 4)
SCHEDULE = [["1", "3", "5", "7"], ["2", "4", "6", "7"], ["3", "5", "6", "7"], ["4", "5", "6", "7"]]
TRAINED = [0, 1, 1, 2, 2, 3, 3, 4]


def write_run(
    sweep: Path, name: str, label: str, seed: int, acc: list[float], schedule=SCHEDULE, trim=False
) -> None:
    rounds = []
    for r, clients in enumerate(schedule, start=1):
        per_client = {str(c): {"test-acc": a} for c, a in enumerate(acc)}
        evaluation = {} if trim and r < len(schedule) else {"per_client": per_client}
        rounds.append({"round": r, "train": {"clients": clients}, "eval": evaluation})
    run = {"status": "completed", "method": label, "config": {"seed": seed}, "rounds": rounds}
    (sweep / name).mkdir(parents=True)
    (sweep / name / "results.json").write_text(json.dumps(run))
    manifest = sweep / "sweep.json"
    runs = json.loads(manifest.read_text())["runs"] if manifest.exists() else []
    manifest.write_text(json.dumps({"runs": [*runs, {"name": name, "label": label}]}))


def test_the_difference_is_paired_per_client_and_set_against_the_rounds_each_trained(tmp_path: Path) -> None:
    a = [0.7] * 8
    b = [0.5 + 0.05 * t for t in TRAINED]  # B gains with every round a client trained in
    write_run(tmp_path, "a,seed=0", "a", 0, a)
    write_run(tmp_path, "b,seed=0", "b", 0, b)
    (result,) = gap.compare([tmp_path], "a", "b")
    assert result.seed == 0 and result.round == 4
    assert result.trained.tolist() == TRAINED
    assert result.rho == pytest.approx(-1.0)
    assert result.groups == [(0, 0), (1, 1), (2, 2), (3, 4)]  # cuts nearest each quarter, no count split
    text = gap.render([result], "a", "b")
    assert "| 0 | 1 | 70.00 | 50.00 | +20.00 |" in text
    assert "| 3–4 | 3 | 70.00 | 66.67 | +3.33 |" in text


def test_an_earlier_round_counts_only_the_rounds_trained_up_to_it(tmp_path: Path) -> None:
    write_run(tmp_path, "a,seed=0", "a", 0, [0.7] * 8)
    write_run(tmp_path, "b,seed=0", "b", 0, [0.6] * 8)
    (result,) = gap.compare([tmp_path], "a", "b", rnd=2)
    assert result.trained.tolist() == [0, 1, 1, 1, 1, 1, 1, 2]


def test_runs_of_each_seed_are_paired_and_a_seed_only_one_label_has_is_left_out(tmp_path: Path) -> None:
    for seed in (0, 1):
        write_run(tmp_path, f"a,seed={seed}", "a", seed, [0.7] * 8)
    write_run(tmp_path, "b,seed=1", "b", 1, [0.6] * 8)
    assert [g.seed for g in gap.compare([tmp_path], "a", "b")] == [1]


def test_groups_are_near_equal_and_cover_every_count_once() -> None:
    trained = np.repeat(np.arange(1, 12), [2, 3, 4, 6, 13, 7, 7, 9, 6, 3, 4])
    groups = gap.groups_of(trained)
    sizes = [int(((trained >= lo) & (trained <= hi)).sum()) for lo, hi in groups]
    assert groups == [(1, 4), (5, 6), (7, 8), (9, 11)] and sizes == [15, 20, 16, 13]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"schedule": [SCHEDULE[0], ["0", "1"], *SCHEDULE[2:]]},
            "not paired, the runs trained different clients in round 2",
        ),
        ({"trim": True, "round": 3}, "no per-client evaluation at round 3"),
    ],
)
def test_runs_that_cannot_be_paired_are_named(tmp_path: Path, change: dict, message: str, capsys) -> None:
    write_run(tmp_path, "a,seed=0", "a", 0, [0.7] * 8)
    write_run(
        tmp_path,
        "b,seed=0",
        "b",
        0,
        [0.6] * 8,
        schedule=change.get("schedule", SCHEDULE),
        trim=change.get("trim", False),
    )
    argv = [str(tmp_path), "a", "b"] + (["--round", str(change["round"])] if "round" in change else [])
    assert gap.main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_label_without_completed_runs_is_named(tmp_path: Path, capsys) -> None:
    write_run(tmp_path, "a,seed=0", "a", 0, [0.7] * 8)
    assert gap.main([str(tmp_path), "a", "fedbabu"]) == 2
    assert "no completed run labelled 'fedbabu'" in capsys.readouterr().err
