"""`fedvit sweep --jobs N`: up to N runs at once, each in its own spawned process with one thread
and its own run.log; the same results as one at a time; the resume rules and failures as without
jobs; an interrupted parent leaves no child and marks its runs interrupted; bad values exit 2.

The run functions below are module-level so that a spawned child can import them (it gets this
process's sys.path); what a child did, it writes into its run directory as ``fake.json``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fedhelpers import tiny_sweep_base
from tinyapp import describe_procs, marked

from fedvit.cli import main
from fedvit.sweep import parallel, run_sweep, spec_from_mapping

FEDVIT = Path(sys.executable).with_name("fedvit")
LONG = 200_000  # more than a pipe's buffer: the parent must read while the child sends


def _completed(run_dir: Path, acc: float) -> None:
    test_acc = {"n": 3, "mean": acc, "std": 0.0}
    summary = {"last_round": {"test_acc": test_acc}, "best_val_round": {"test_acc": test_acc}}
    (run_dir / "results.json").write_text(json.dumps({"status": "completed", "summary": summary}))


def fake_run(rc: dict, cfg) -> tuple[bool, str]:
    """In the child: record what it was given and how it runs, then by the config's ``alpha``:
    0.1 fails (with a message longer than a pipe holds), 0.2 raises, 0.3 kills its process, 0.4
    first waits (up to 60 s) until another run of the sweep has started and holds on one second;
    any other alpha completes."""
    import torch

    out = Path(rc["output-dir"])
    run_dir = out / rc["run-name"]
    started = out / "started"
    started.mkdir(exist_ok=True)
    (started / rc["run-name"]).touch()
    running = out / "running"
    running.mkdir(exist_ok=True)
    (running / rc["run-name"]).touch()
    record = {
        "resume": rc.get("resume"),
        "left": sorted(p.name for p in run_dir.iterdir()),
        "threads": torch.get_num_threads(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "pid": os.getpid(),
        "parent": os.getppid(),
        "at_once": len(list(running.iterdir())),
    }
    alpha = cfg.data.partition.alpha
    if alpha == 0.4:
        deadline = time.monotonic() + 60
        while len(list(started.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        record["met_another"] = len(list(started.iterdir())) >= 2
        time.sleep(1.0)
    (run_dir / "fake.json").write_text(json.dumps(record))
    print(f"fake run {rc['run-name']} says hello")
    (running / rc["run-name"]).unlink()
    if alpha == 0.1:
        return False, "RuntimeError: diverged" + "!" * LONG
    if alpha == 0.2:
        raise OSError("disk full")
    if alpha == 0.3:
        os._exit(3)
    _completed(run_dir, 0.5 + cfg.seed / 100)
    return True, "ok"


def fake_record(out: Path, name: str) -> dict:
    return json.loads((out / name / "fake.json").read_text())


def manifest(out: Path) -> dict[str, dict]:
    return {e["name"]: e for e in json.loads((out / "sweep.json").read_text())["runs"]}


# --------------------------------------------------------------------------- real runs (slow)


@pytest.mark.slow
def test_two_at_once_give_the_same_results_as_one_at_a_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    cache = tmp_path / "cache"
    spec = {
        "base": tiny_sweep_base(cache),
        "grid": {"method": ["fedavg", "fedper"]},
        "seeds": [0],
        "engine": "inprocess",
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a child runs: one thread
    try:
        one = run_sweep(spec_from_mapping({**spec, "out": str(tmp_path / "one")}), progress=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps({**spec, "out": str(tmp_path / "two"), "jobs": 2}))
    capsys.readouterr()
    assert main(["sweep", str(spec_file)]) == 0
    err = capsys.readouterr().err
    assert one.ok and one.ran == ["method=fedavg,seed=0", "method=fedper,seed=0"]
    for name in one.ran:
        a = json.loads((tmp_path / "one" / name / "results.json").read_text())
        b = json.loads((tmp_path / "two" / name / "results.json").read_text())
        assert b["status"] == "completed"
        assert [r["eval"]["per_client"] for r in b["rounds"]] == [
            r["eval"]["per_client"] for r in a["rounds"]
        ]
        assert b["summary"] == a["summary"]
        log = (tmp_path / "two" / name / "run.log").read_text()
        assert "[fedvit] round 2/2" in log  # the run's own output went to its log ...
        assert f"{name}: starting (log: {tmp_path / 'two' / name / 'run.log'})" in err
        assert f"{name}: completed in" in err
    assert "[fedvit] round" not in err  # ... not to the parent's stderr
    assert (tmp_path / "two" / "sweep.md").read_text().splitlines()[-2:] == (
        (tmp_path / "one" / "sweep.md").read_text().splitlines()[-2:]
    )
    assert manifest(tmp_path / "two")["method=fedper,seed=0"]["status"] == "completed"


def _alive(pid: int) -> bool:
    """A process that exists and is no zombie (an orphan's zombie waits for whoever adopted it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def _run_children(pid: int) -> list[int]:
    """The processes ``pid`` spawned to run (not multiprocessing's resource tracker)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            out.append(int(stat.parent.name))
    return out


# How the sweep is stopped -> its exit status, its last line, what its runs are marked in sweep.json.
STOPS = {
    "sigterm": (143, "fedvit: terminated by signal 15", "interrupted"),
    "ctrl-c": (130, "fedvit: interrupted", "interrupted"),
    "sigkill": (-9, None, "running"),  # it cannot write; its children die with it all the same
}


@pytest.mark.slow
@pytest.mark.parametrize("how", list(STOPS))
def test_an_interrupted_parent_stops_its_children_and_a_rerun_resumes_them(
    how: str, tmp_path: Path, mark: str
) -> None:
    out = tmp_path / "s"
    spec = {
        "base": tiny_sweep_base(tmp_path / "cache", rounds=500),
        "grid": {"method": ["fedavg", "fedper"]},
        "engine": "inprocess",
        "out": str(out),
    }
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps(spec))
    names = ["method=fedavg", "method=fedper"]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    parent = subprocess.Popen(
        [str(FEDVIT), "sweep", str(spec_file), "--jobs", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: "Ctrl-C" goes to the whole group
        # As in a terminal: a test run started in the background (`cmd &` in a script) passes
        # SIGINT on ignored, and a Ctrl-C would then rightly do nothing.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        while not all((out / n / "checkpoint" / "state.json").is_file() for n in names):
            assert parent.poll() is None and time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.2)
        children = _run_children(parent.pid)
        assert len(children) == 2
        if how == "ctrl-c":
            os.killpg(parent.pid, signal.SIGINT)
        else:
            parent.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        _, err = parent.communicate(timeout=60)
        deadline = time.monotonic() + 20  # a child killed with its parent may take a moment to go
        while marked(mark) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
    code, last_line, status = STOPS[how]
    assert parent.returncode == code, err
    assert last_line is None or err.strip().splitlines()[-1] == last_line
    left = marked(mark)
    assert left == [], describe_procs(left)
    assert not [pid for pid in children if _alive(pid)]
    entries = manifest(out)
    assert {n: entries[n]["status"] for n in names} == dict.fromkeys(names, status)
    assert all((entries[n]["wall_s"] or 0) > 0 for n in names) == (status == "interrupted")
    rounds = {n: json.loads((out / n / "checkpoint" / "state.json").read_text())["round"] for n in names}
    # The next invocation continues both from their checkpoints (here with a stand-in run).
    messages: list[str] = []
    res = run_sweep(spec_from_mapping(spec), run_fn=fake_run, jobs=2, progress=messages.append)
    assert res.ok and res.ran == names
    for n in names:
        assert fake_record(out, n)["resume"] == str(out / n)
        assert any(f"{n}: continuing from its checkpoint after round {rounds[n]}" in m for m in messages)
        assert (manifest(out)[n]["action"], manifest(out)[n]["resumed_after_round"]) == ("resumed", rounds[n])


# --------------------------------------------------------------------------- stand-in runs


def test_resume_rules_and_at_most_n_at_once_each_with_one_thread(tmp_path: Path) -> None:
    out = tmp_path / "s"
    spec = spec_from_mapping(
        {
            "base": {"alpha": 0.4},  # fake_run: wait for another run
            "grid": {"method": ["fedavg"]},
            "seeds": [0, 1, 2, 3],
            "engine": "inprocess",
            "out": str(out),
            "jobs": 2,
        }
    )
    done, checkpointed, half, fresh = (f"method=fedavg,seed={s}" for s in range(4))
    (out / done).mkdir(parents=True)
    _completed(out / done, 0.9)
    (out / checkpointed / "checkpoint").mkdir(parents=True)
    (out / checkpointed / "checkpoint" / "state.json").write_text(json.dumps({"round": 1}))
    (out / checkpointed / "results.json").write_text(json.dumps({"status": "running"}))
    (out / half).mkdir()
    (out / half / "stray.txt").write_text("left over")
    messages: list[str] = []
    res = run_sweep(spec, run_fn=fake_run, progress=messages.append)
    assert res.ok and res.skipped == [done] and res.ran == [checkpointed, half, fresh]
    assert not (out / done / "fake.json").exists()
    records = {n: fake_record(out, n) for n in res.ran}
    assert records[checkpointed]["resume"] == str(out / checkpointed)
    assert records[checkpointed]["left"] == ["checkpoint", "results.json", "run.log"]
    assert records[half] == {**records[half], "resume": None, "left": ["run.log"]}  # stray.txt removed
    assert records[fresh]["resume"] is None
    # Two at once, never more; each in its own process, a child of the sweep, with one thread.
    assert all(r["met_another"] for r in records.values())
    assert max(r["at_once"] for r in records.values()) == 2
    assert len({r["pid"] for r in records.values()} | {os.getpid()}) == 4
    assert {(r["parent"], r["threads"], r["omp"]) for r in records.values()} == {(os.getpid(), 1, "1")}
    for n in res.ran:
        assert f"fake run {n} says hello" in (out / n / parallel.RUN_LOG).read_text()
    entries = manifest(out)
    assert {n: (e["status"], e["action"]) for n, e in entries.items()} == {
        done: ("completed", "skipped"),
        checkpointed: ("completed", "resumed"),
        half: ("completed", "fresh"),
        fresh: ("completed", "fresh"),
    }
    assert entries[checkpointed]["resumed_after_round"] == 1
    assert any(f"{half}: no checkpoint; removed what was left and starting over" in m for m in messages)


def test_failed_runs_are_recorded_and_the_others_complete(tmp_path: Path) -> None:
    out = tmp_path / "s"
    spec = {"grid": {"alpha": [0.1, 0.2, 0.3, 1.0]}, "engine": "inprocess", "out": str(out)}
    res = run_sweep(spec_from_mapping(spec), run_fn=fake_run, jobs=3, progress=lambda m: None)
    assert res.ran == ["alpha=0.1", "alpha=0.2", "alpha=0.3", "alpha=1.0"]
    assert list(res.failed) == ["alpha=0.1", "alpha=0.2", "alpha=0.3"]
    entries = manifest(out)
    assert {n: e["status"] for n, e in entries.items()} == {
        "alpha=0.1": "failed",
        "alpha=0.2": "failed",
        "alpha=0.3": "failed",
        "alpha=1.0": "completed",
    }
    assert entries["alpha=0.1"]["message"] == "RuntimeError: diverged" + "!" * LONG
    assert entries["alpha=0.2"]["message"] == "OSError: disk full"
    log = out / "alpha=0.3" / "run.log"
    assert entries["alpha=0.3"]["message"] == f"its process exited with code 3 without a result (see {log})"
    assert "OSError: disk full" in (out / "alpha=0.2" / "run.log").read_text()  # the traceback
    assert "| 1.0 | 50.00 |" in (out / "sweep.md").read_text()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--jobs", "0"], "--jobs: must be a whole number >= 1 (runs at once), got '0'"),
        (["--jobs", "-2"], "--jobs: must be a whole number >= 1 (runs at once), got '-2'"),
        (["--jobs", "two"], "--jobs: must be a whole number >= 1 (runs at once), got 'two'"),
        (["--jobs", "1.5"], "--jobs: must be a whole number >= 1 (runs at once), got '1.5'"),
        (["--jobs", "2", "--engine", "simulation"], "--jobs 2 needs the inprocess engine"),
        (["--engine", "simulation"], "--jobs 3 needs the inprocess engine"),  # the spec's jobs: 3
    ],
)
def test_bad_jobs_exit_2_with_one_line(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("grid:\n  method: [fedavg]\nengine: inprocess\njobs: 3\n")
    out = tmp_path / "s"
    assert main(["sweep", str(spec_file), "--out", str(out), *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("fedvit: error: ") and needle in err[0], err
    assert not out.exists()


def test_jobs_in_the_spec_and_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("grid:\n  method: [fedavg, fedper]\njobs: 0\n")
    assert main(["sweep", str(spec_file), "--out", str(tmp_path / "s"), "--dry-run"]) == 2
    assert "sweep jobs: must be an integer >= 1 (runs at once), got 0" in capsys.readouterr().err
    # The command line wins: --jobs 1 with the simulation engine is fine; more jobs than runs too.
    assert main(["sweep", str(spec_file), "--out", str(tmp_path / "s"), "--jobs", "1", "--dry-run"]) == 0
    spec = spec_from_mapping({"grid": {"method": ["fedavg"]}, "engine": "inprocess", "jobs": 8})
    assert spec.jobs == 8 and spec.to_dict()["jobs"] == 8
