"""The ``fedvit`` command: subcommands, one-line config errors with exit code 2, and (slow) a
failing run and Ctrl-C that exit non-zero and leave no processes behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tinyapp import MARK, describe_procs, marked

from fedvit.cli import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedvit: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_subcommands_are_the_real_ones_only() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    real = {"run", "partition", "config", "report", "study", "bench", "pretrain", "export", "sweep", "alpha"}
    assert set(sub.choices) == real  # no do-nothing stubs
    assert len(COMMANDS) == len(real)
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_config_prints_the_resolved_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--run-config", "method=fedavg num-server-rounds=2", "-c", "seed=4"]) == 0
    out = capsys.readouterr().out
    assert "name: fedavg" in out and "num_rounds: 2" in out and "seed: 4" in out


def test_config_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "-c", "num-clients=4", "--json"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["clients"]["num_clients"] == 4


def test_config_imports_no_torch_flwr_or_method_module() -> None:
    """``fedvit config`` of a method with typed options stays light (what keeps it fast)."""
    script = (
        "import sys\n"
        "from fedvit.cli import main\n"
        "assert main(['config', '-c', 'method=fedtp', '--json']) == 0\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'flwr')\n"
        "         or m.startswith(('strategies.', 'clients.'))]\n"
        "print('HEAVY', sorted(heavy)[:5], file=sys.stderr)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["method"]["strategy"] == "fedtp"
    assert "HEAVY []" in res.stderr, res.stderr


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["config", "-c", "bogus=1"], ["unknown run-config key 'bogus'"]),
        (["config", "-c", "alpha=-1"], ["data.partition.alpha", "must be > 0"]),
        (["config", "-c", "method=nope"], ["unknown method 'nope'"]),
        (["config", "-c", "alpha"], ["cannot parse 'alpha'"]),
        (["run", str(REPO), "-c", "bogus=1"], ["unknown run-config key"]),
        (
            ["run", str(REPO), "-c", "num-clients=3", "--federation-config", "num-supernodes=4"],
            ["num-clients=4", "at most one per client"],
        ),
        (["run", str(REPO), "--federation-config", "num-cpus=1"], ["unknown federation-config"]),
        (["run", "/nonexistent/app"], ["not a Flower app"]),
        (["partition", "-c", "num-clients=0"], ["clients.num_clients"]),
    ],
)
def test_config_errors_are_one_line_and_exit_2(
    argv: list[str], needles: list[str], capsys: pytest.CaptureFixture[str], mark: str
) -> None:
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, *needles)
    assert marked(mark) == []


def test_console_script_fails_fast_on_a_config_error(tmp_path: Path) -> None:
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "fedvit.cli", "run", str(REPO), "--run-config", "num-server-round=3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    elapsed = time.monotonic() - t0
    assert res.returncode == 2, res.stderr
    _one_line_error(res.stderr, "num-server-round")
    assert elapsed < 5, elapsed  # interpreter start + imports; nothing of Flower runs


def test_partition_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = f"num-clients=3 partition=iid overrides='data.cache_dir={tmp_path}'"
    assert main(["partition", "-c", rc, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["client_id"] for r in rows] == [0, 1, 2]
    assert all(sum(r["train_hist"]) == r["n_train"] > 0 for r in rows)


def test_partition_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = f"num-clients=2 overrides='data.cache_dir={tmp_path}'"
    assert main(["partition", "-c", rc]) == 0
    out = capsys.readouterr().out
    assert "client" in out and "2 clients" in out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_failing_server_app_exits_non_zero_with_the_reason(
    tiny_app: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mark: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["run", str(tiny_app), "-c", "fail=true", "--federation-config", "num-supernodes=2", "--quiet"]
    argv += ["--timeout", "200"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "finished:failed" in err and "tinyapp: deliberate failure" in err, err
    assert marked(mark) == [], describe_procs(marked(mark))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ctrl_c_during_a_run_exits_130_and_leaves_nothing(tiny_app: Path, tmp_path: Path, mark: str) -> None:
    # As a terminal's Ctrl-C does: SIGINT to the whole foreground process group of `fedvit run`.
    cmd = [sys.executable, "-m", "fedvit.cli", "run", str(tiny_app), "-c", "sleep=120.0"]
    cmd += ["--federation-config", "num-supernodes=2", "--quiet"]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "CI": "true"},
        # Ctrl-C's default disposition, as in a terminal (a background CI job inherits it ignored).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240  # generous: CI machines can be loaded
        while not any("flwr-simulation" in c for c in describe_procs(marked(mark))):
            assert time.monotonic() < deadline, describe_procs(marked(mark))
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert marked(mark) == [], describe_procs(marked(mark))
    assert MARK in os.environ  # the mark reached the children through the environment
