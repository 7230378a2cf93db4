"""TensorBoard event files in <run dir>/tb/: one step per round, written by the ServerApp's recorder
(in-process here), appended by a resumed run without showing a step twice; output.tensorboard=false
writes none."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import fedhelpers
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from fedvit.config import load_config
from fedvit.inprocess import InProcessGrid
from fedvit.server_app import run
from fedvit.tensorboard import TensorBoardLog

TINY = "model.depth=2 model.embed_dim=32 model.num_heads=2 train.batch_size=64"


def run_config(tmp_path: Path, rounds: int, extra: str = "", **kw) -> dict:
    return fedhelpers.run_config(tmp_path, "fedper", TINY, rounds, extra, **kw)


def shown(tb: Path) -> EventAccumulator:
    """The event files in ``tb`` as TensorBoard shows them (purged steps dropped)."""
    acc = EventAccumulator(str(tb))
    acc.Reload()
    return acc


def raw_steps(tb: Path, tag: str) -> Counter:
    """How often each step of ``tag`` was written, over all event files in ``tb``, nothing purged."""
    steps: Counter = Counter()
    for path in sorted(tb.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps.update(event.step for v in event.summary.value if v.tag == tag)
    return steps


@dataclass
class History:
    """One run's event files after each of three sessions: 2 rounds; resumed to 3; then, the round-3
    checkpoint lost as if the process had died after recording round 3, resumed again to 4."""

    run_dir: Path
    after_2: Path  # copies of tb/ after the first and the second session
    after_3: Path
    results_2: dict
    results_4: dict


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    tmp_path = tmp_path_factory.mktemp("tb-run")
    with pytest.MonkeyPatch.context() as mp:  # the autouse isolation is per test, this runs once
        mp.setenv("FEDVIT_STATE_DIR", str(tmp_path / "state"))
        _, results_2, run_dir = fedhelpers.federate(run_config(tmp_path, rounds=2))
        shutil.copytree(run_dir / "tb", tmp_path / "tb-2")
        shutil.copytree(run_dir / "checkpoint", tmp_path / "checkpoint-2")
        for rounds in (3, 4):
            rc = run_config(tmp_path, rounds=rounds, resume=str(run_dir))
            run(InProcessGrid(rc, 3), load_config(rc))
            if rounds == 3:
                shutil.copytree(run_dir / "tb", tmp_path / "tb-3")
                shutil.rmtree(run_dir / "checkpoint")
                shutil.copytree(tmp_path / "checkpoint-2", run_dir / "checkpoint")  # round 3's is lost
    results_4 = json.loads((run_dir / "results.json").read_text())
    return History(run_dir, tmp_path / "tb-2", tmp_path / "tb-3", results_2, results_4)


def test_a_run_writes_round_statistics_histograms_and_resources(history: History) -> None:
    acc = shown(history.after_2)
    results = history.results_2
    scalars = set(acc.Tags()["scalars"])
    for metric in ("test_acc", "val_acc", "test_loss", "val_loss"):
        assert {f"{metric}/{s}" for s in ("mean", "weighted_mean", "std", "q10", "q50", "q90")} <= scalars
    assert {"train_loss/mean", "train/clients", "eval/clients_evaluated"} <= scalars
    assert {"resources/round_s", "resources/elapsed_s", "resources/server_peak_rss_mb"} <= scalars
    assert {"clients/test_acc", "clients/val_acc"} <= set(acc.Tags()["histograms"])
    assert not any(t.endswith("_sampled/mean") for t in scalars)  # every client evaluated
    for tag, key in (("test_acc/mean", "mean"), ("test_acc/weighted_mean", "weighted_mean")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2]
        expected = [r["eval"]["test_acc"][key] for r in results["rounds"]]
        assert [e.value for e in events] == pytest.approx(expected, rel=1e-6)
    histogram = acc.Histograms("clients/test_acc")[-1].histogram_value
    assert histogram.num == 3  # one value per client
    last = results["rounds"][-1]["eval"]["per_client"]
    assert histogram.sum == pytest.approx(sum(m["test-acc"] for m in last.values()), rel=1e-6)
    rounds_s = [e.value for e in acc.Scalars("resources/round_s")]
    elapsed = [r["elapsed_s"] for r in results["rounds"]]
    assert rounds_s == pytest.approx([elapsed[0], elapsed[1] - elapsed[0]], abs=1e-3)
    assert [e.value for e in acc.Scalars("eval/clients_evaluated")] == [3.0, 3.0]
    assert acc.Scalars("resources/server_peak_rss_mb")[-1].value > 50  # a process with torch loaded


def test_resume_appends_the_new_rounds_without_writing_a_step_twice(history: History) -> None:
    assert len(list(history.after_3.glob("events.out.tfevents.*"))) == 2  # appended, not rewritten
    assert raw_steps(history.after_3, "test_acc/mean") == {1: 1, 2: 1, 3: 1}
    assert [e.step for e in shown(history.after_3).Scalars("train_loss/mean")] == [1, 2, 3]


def test_a_round_recorded_before_a_crash_and_run_again_is_shown_once(history: History) -> None:
    """Round 3 recorded, then the process died before its checkpoint: the resumed run runs round 3
    again; TensorBoard shows the new round 3 only."""
    tb = history.run_dir / "tb"
    assert raw_steps(tb, "test_acc/mean")[3] == 2  # written by both sessions ...
    events = shown(tb).Scalars("test_acc/mean")
    assert [e.step for e in events] == [1, 2, 3, 4]  # ... shown once: the latest
    final = [r["eval"]["test_acc"]["mean"] for r in history.results_4["rounds"]]
    assert [e.value for e in events] == pytest.approx(final, rel=1e-6)


def test_tensorboard_can_be_turned_off(tmp_path: Path) -> None:
    _, _, run_dir = fedhelpers.federate(run_config(tmp_path, rounds=1, extra="output.tensorboard=false"))
    assert (run_dir / "results.json").is_file()
    assert not (run_dir / "tb").exists()


def entry(step: int, acc: float, mode: str = "full") -> dict:
    stats = {"n": 2, "mean": acc, "weighted_mean": acc, "std": 0.1, "q10": acc - 0.1, "q90": acc + 0.1}
    per_client = {"0": {"test-acc": acc - 0.1}, "1": {"test-acc": acc + 0.1}}
    ev = {
        "mode": mode,
        "clients_evaluated": 2,
        "clients_total": 4,
        "per_client": per_client,
        "test_acc": stats,
    }
    return {"round": step, "elapsed_s": 10.0 * step, "eval": ev}


def test_a_sampled_round_is_written_apart_from_full_rounds(tmp_path: Path) -> None:
    log = TensorBoardLog(tmp_path)
    for step, mode in ((1, "full"), (2, "sampled"), (3, "full")):
        log.write_round(entry(step, 0.1 * step, mode))
    log.close()
    acc = shown(tmp_path / "tb")
    assert [e.step for e in acc.Scalars("test_acc/mean")] == [1, 3]
    assert [(e.step, e.value) for e in acc.Scalars("test_acc_sampled/mean")] == [(2, pytest.approx(0.2))]
    assert [e.value for e in acc.Scalars("eval/clients_total")] == [4.0, 4.0, 4.0]
    assert [e.value for e in acc.Scalars("resources/round_s")] == [10.0, 10.0, 10.0]
