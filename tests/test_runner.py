"""fedvit.runner: run-config syntax, paths, status parsing, ports, process teardown, the watchdog
and the reaping of a dead launcher's leftovers, and real ``flwr run`` simulations of a tiny
throwaway app (marked slow)."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from tinyapp import describe_procs, marked

from fedvit import runner
from fedvit.config import ConfigError
from fedvit.launch import prepare, procs, session, superlink
from fedvit.launch.ray_head import PrivateRayHead, RayHeadSpec
from fedvit.runner import (
    RESERVED_PORTS,
    STATUS_COMPLETED,
    LocalSuperLink,
    RunnerError,
    absolutize_paths,
    descendants,
    federation_config,
    find_free_port,
    format_kv,
    format_run_config,
    is_final,
    kill_processes,
    load_kv_args,
    local_superlink,
    owns_listening_port,
    parse_kv_string,
    parse_ls_json,
    parse_submit_json,
    prepare_run_config,
    proc_environ,
    read_proc,
    run_flwr,
    tagged_processes,
    toml_value,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- run-config syntax


def test_parse_kv_string_reads_toml_values_like_flower() -> None:
    parsed = parse_kv_string("a=1 b=2.5 c=true d='x y' e=\"q'z\" f=fedper g=-3 h=/tmp/x")
    assert parsed == {
        "a": 1,
        "b": 2.5,
        "c": True,
        "d": "x y",
        "e": "q'z",
        "f": "fedper",
        "g": -3,
        "h": "/tmp/x",
    }
    assert parse_kv_string("overrides='train.lr=0.05 model.depth=6'") == {
        "overrides": "train.lr=0.05 model.depth=6"
    }
    assert parse_kv_string("overrides=train.lr=0.05") == {"overrides": "train.lr=0.05"}
    assert parse_kv_string("  ") == {}


@pytest.mark.parametrize("bad", ["alpha", "a=1 junk", "a='unterminated", "a=[1,2]"])
def test_parse_kv_string_rejects_what_is_not_key_value(bad: str) -> None:
    with pytest.raises(ConfigError, match="run-config"):
        parse_kv_string(bad)


def test_load_kv_args_merges_in_order_and_reads_toml_files(tmp_path: Path) -> None:
    f = tmp_path / "rc.toml"
    f.write_text('method = "fedavg"\nseed = 3\n')
    assert load_kv_args(["seed=1 alpha=0.1", str(f), "seed=7"]) == {
        "seed": 7,
        "alpha": 0.1,
        "method": "fedavg",
    }
    with pytest.raises(ConfigError, match="cannot read"):
        load_kv_args([str(tmp_path / "missing.toml")])


TRICKY = {
    "int": 5,
    "neg": -2,
    "float": 0.1,
    "big": 1e-08,
    "yes": True,
    "no": False,
    "empty": "",
    "spaces": "a b  c",
    "backslash": r"C:\data\new",
    "single": "it's",
    "single-backslash": "it's a \\ path",
    "equals": "train.lr=0.05 model.depth=6",
    "unicode": "données-ü",
    "hash": "a#b",
}


def test_format_run_config_round_trips_through_flowers_own_parser() -> None:
    from flwr.common.config import parse_config_args

    text = format_run_config(TRICKY)
    assert parse_config_args([text]) == TRICKY
    assert parse_kv_string(text) == TRICKY


def test_format_run_config_values() -> None:
    assert format_run_config({"a": 1, "b": "x", "c": True, "d": None}) == "a=1 b='x' c=true"
    assert toml_value(Path("/a/b")) == "'/a/b'"
    assert toml_value(float("inf")) == "inf"


@pytest.mark.parametrize("value", ["both ' and \"", "line\nbreak", [1, 2], {"a": 1}])
def test_format_run_config_refuses_what_flower_cannot_parse(value: object) -> None:
    with pytest.raises(ConfigError, match="run-config 'k'"):
        format_run_config({"k": value})


def test_format_kv_refuses_odd_keys() -> None:
    with pytest.raises(ConfigError, match="invalid key"):
        format_kv({"a b": 1})


# --------------------------------------------------------------------------- paths


def test_absolutize_paths(tmp_path: Path) -> None:
    rc = {
        "data-dir": "data",
        "output-dir": "../out",
        "resume": "",
        "method": "fedper",
        "overrides": (
            "data.cache_dir=cache model.pretrained=/abs/w.pt train.lr=0.1 output.dir='q' server.resume=null"
        ),
    }
    out = absolutize_paths(rc, cwd=tmp_path)
    assert out["data-dir"] == str(tmp_path / "data")
    assert out["output-dir"] == str((tmp_path / ".." / "out").resolve())
    assert out["resume"] == "" and out["method"] == "fedper"
    assert out["overrides"].split() == [
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.pretrained=/abs/w.pt",
        "train.lr=0.1",
        "output.dir='q'",
        "server.resume=null",
    ]
    assert rc["data-dir"] == "data"  # the input is not modified
    assert absolutize_paths({"resume": "~/runs/x"})["resume"] == str(Path.home() / "runs" / "x")


# --------------------------------------------------------------------------- status


def _ls(status: str, details: str = "N/A", run_id: str = "42") -> str:
    runs = [{"run-id": run_id, "status": status, "status-details": details, "elapsed": 1.0}]
    return json.dumps({"success": True, "runs": runs})


def test_parse_ls_json() -> None:
    assert parse_ls_json(_ls("finished:completed"), "42") == ("finished:completed", "")
    failed = _ls("finished:failed", "Simulation failed with exception: boom")
    assert parse_ls_json("Using SuperLink: x\n" + failed, "42") == (
        "finished:failed",
        "Simulation failed with exception: boom",
    )
    assert parse_ls_json(_ls("running"), "42")[0] == "running"
    assert is_final("finished:stopped") and not is_final("running") and not is_final("pending")


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        json.dumps({"success": False, "error-message": "Connection to the SuperLink is unavailable"}),
        _ls("running", run_id="7"),
    ],
)
def test_parse_ls_json_errors(text: str) -> None:
    with pytest.raises(RunnerError):
        parse_ls_json(text, "42")


def test_parse_submit_json() -> None:
    assert parse_submit_json('{"success": true, "run-id": "123", "fab-id": "a/b"}') == "123"
    with pytest.raises(RunnerError, match="unavailable"):
        parse_submit_json('{"success": false, "error-message": "SuperLink unavailable"}')


def _session(**kw: object) -> runner._Session:
    defaults: dict[str, object] = {
        "connection": "c",
        "env": {},
        "cwd": Path("."),
        "deadline": None,
        "remote": False,
        "status_timeout_s": 3.0,
        "say": lambda _m: None,
    }
    return runner._Session(**{**defaults, **kw})  # type: ignore[arg-type]


def _fake_flwr(monkeypatch: pytest.MonkeyPatch, answers: list[str]) -> list[list[str]]:
    calls: list[list[str]] = []

    def fake(args: list[str], env: object, cwd: object, timeout: float) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        out = answers.pop(0) if len(answers) > 1 else answers[0]
        return subprocess.CompletedProcess(args, 0, stdout=out, stderr="")

    class FakePrimed:
        """A primed ``flwr`` whose calls are recorded as "primed ARGS"."""

        def __init__(self, env: object, cwd: object) -> None:
            pass

        def run(self, args: list[str], env: object, timeout: float) -> subprocess.CompletedProcess[str]:
            return fake(["primed", *args], env, None, timeout)

        def close(self) -> None:
            pass

    monkeypatch.setattr(session, "_flwr", fake)
    monkeypatch.setattr(session, "PrimedFlwr", FakePrimed)
    monkeypatch.setattr(session.time, "sleep", lambda _s: None)
    return calls


def _fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """time.monotonic() advances one second per call."""
    ticks = itertools.count()
    monkeypatch.setattr(session.time, "monotonic", lambda: float(next(ticks)))


def test_final_status_is_polled_until_final(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_flwr(monkeypatch, [_ls("running"), _ls("running"), _ls("finished:failed", "boom")])
    outcome = runner.RunOutcome(run_id="42", status="submitted", details="", returncode=1)
    _session().wait_final_status(outcome)
    assert (outcome.status, outcome.details, outcome.returncode, outcome.ok) == (
        "finished:failed",
        "boom",
        1,
        False,
    )
    ls = ["ls", "--run-id", "42", "c", "--format", "json"]
    # each query after the first runs in a flwr CLI started while waiting (no cold start per poll)
    assert calls == [ls, ["primed", *ls], ["primed", *ls]]

    _fake_flwr(monkeypatch, [_ls("finished:completed")])
    outcome = runner.RunOutcome(run_id="42", status="submitted", details="", returncode=1)
    _session().wait_final_status(outcome)
    assert outcome.ok and outcome.returncode == 0


def test_final_status_gives_up_when_nobody_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_flwr(monkeypatch, ['{"success": false, "error-message": "SuperLink unavailable"}'])
    _fake_clock(monkeypatch)
    outcome = runner.RunOutcome(run_id="42", status="submitted", details="", returncode=1)
    _session(status_timeout_s=5.0).wait_final_status(outcome)
    assert not outcome.ok and outcome.returncode == 1 and "SuperLink unavailable" in outcome.details


def test_final_status_respects_the_deadline_and_stops_a_remote_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_flwr(monkeypatch, [_ls("running")])
    _fake_clock(monkeypatch)
    outcome = runner.RunOutcome(run_id="42", status="submitted", details="", returncode=1)
    _session(deadline=10.0, remote=True, status_timeout_s=100.0).wait_final_status(outcome)
    assert (outcome.status, outcome.returncode) == ("timeout", 124)
    assert calls[-1] == ["stop", "42", "c"]


def test_teardown_holds_ctrl_c_until_it_is_done() -> None:
    # Python's own Ctrl-C handler, as in a foreground terminal (a CI job started in the background
    # inherits SIGINT ignored, which would make this test vacuous).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt), runner._deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            done.append(True)
        assert done == [True]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, previous)


def test_federation_config() -> None:
    assert federation_config(3) == {"num-supernodes": 3, "client-resources-num-cpus": 1}
    assert federation_config(3, 2, 0.5, {"num-supernodes": 4, "verbose": True}) == {
        "num-supernodes": 4,
        "client-resources-num-cpus": 2,
        "client-resources-num-gpus": 0.5,
        "verbose": True,
    }
    assert federation_config(None, None, 0.0) == {}
    with pytest.raises(ConfigError, match="unknown federation-config"):
        federation_config(2, extra={"num-clients": 2})
    with pytest.raises(ConfigError, match="num-supernodes"):
        federation_config(0)


def test_auto_gpus_per_client_shares_the_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    def cfg(device: str) -> SimpleNamespace:
        return SimpleNamespace(clients=SimpleNamespace(device=device))

    monkeypatch.setattr(prepare, "visible_gpus", lambda: 1)
    assert runner.auto_gpus_per_client(cfg("auto"), 3) == 0.3333
    assert runner.auto_gpus_per_client(cfg("cuda:0"), 1) == 1.0
    assert runner.auto_gpus_per_client(cfg("cpu"), 3) == 0.0
    assert runner.auto_gpus_per_client(None, 3) == 0.0  # not a fedvit app
    monkeypatch.setattr(prepare, "visible_gpus", lambda: 2)
    assert runner.auto_gpus_per_client(cfg("auto"), 1) == 1.0
    assert runner.auto_gpus_per_client(cfg("auto"), 8) == 0.25
    monkeypatch.setattr(prepare, "visible_gpus", lambda: 0)
    assert runner.auto_gpus_per_client(cfg("auto"), 3) == 0.0


# --------------------------------------------------------------------------- preparing a run


def test_prepare_run_config_for_another_app(tiny_app: Path, tmp_path: Path) -> None:
    prepared = prepare_run_config(tiny_app, {"output-dir": "out", "label": "x"}, cwd=tmp_path)
    assert prepared.run_config == {"output-dir": str(tmp_path / "out"), "label": "x"}
    assert prepared.num_clients is None and prepared.output_dir is None
    with pytest.raises(ConfigError, match=r"unknown run-config key\(s\) \['nope'\]"):
        prepare_run_config(tiny_app, {"nope": 1})
    with pytest.raises(ConfigError, match="not a Flower app"):
        prepare_run_config(tmp_path, {})


def test_prepare_run_config_for_fedvit_pins_paths_and_run_name(tmp_path: Path) -> None:
    prepared = prepare_run_config(REPO, {"num-clients": 3, "method": "fedavg"}, cwd=tmp_path)
    rc = prepared.run_config
    assert prepared.num_clients == 3
    assert rc["output-dir"] == str(tmp_path / "outputs") and rc["data-dir"] == str(tmp_path / "data")
    assert rc["run-name"].startswith("fedavg-digits-")
    assert prepared.output_dir == tmp_path / "outputs" / rc["run-name"]

    named = prepare_run_config(REPO, {"run-name": "mine", "output-dir": "o"}, cwd=tmp_path)
    assert named.output_dir == tmp_path / "o" / "mine"

    resumed = prepare_run_config(REPO, {"resume": "outputs/old"}, cwd=tmp_path)
    assert resumed.output_dir == tmp_path / "outputs" / "old"
    assert resumed.run_config["resume"] == str(tmp_path / "outputs" / "old")

    remote = prepare_run_config(REPO, {"output-dir": "o"}, cwd=tmp_path, local_paths=False)
    assert remote.run_config["output-dir"] == "o"  # a path on the SuperLink's machine


def test_config_errors_fail_fast_before_anything_starts(tmp_path: Path, mark: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="unknown run-config key"):
        run_flwr(REPO, {"bogus": 1}, cwd=tmp_path)
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(ConfigError, match=r"data\.partition\.alpha"):
        run_flwr(REPO, {"alpha": -1}, cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"num-supernodes=4 but clients\.num_clients=3"):
        run_flwr(REPO, {"num-clients": 3}, num_supernodes=4, cwd=tmp_path)  # workers serve clients: <= N
    assert marked(mark) == []


# --------------------------------------------------------------------------- processes


def test_find_free_port_is_bindable_and_never_a_default() -> None:
    port = find_free_port()
    assert port not in RESERVED_PORTS
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_find_free_port_skips_reserved_and_excluded(monkeypatch: pytest.MonkeyPatch) -> None:
    picks = iter([39091, 8000, 45000, 45001])

    class FakeSocket:
        def __init__(self, *args: object) -> None:
            self.port = next(picks)

        def __enter__(self) -> FakeSocket:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def bind(self, addr: object) -> None:
            pass

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(procs.socket, "socket", FakeSocket)
    assert find_free_port(exclude={45000}) == 45001


def test_process_helpers_find_and_kill_a_tree(mark: str) -> None:
    # A shell that ignores SIGTERM with a child: descendants(), tagged_processes() and the
    # SIGKILL fallback of kill_processes().
    tag = uuid.uuid4().hex
    env = {**os.environ, runner.TAG_VAR: tag}
    proc = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 60 & wait"], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(descendants(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = descendants(proc.pid)
        assert {p.pid for p in tree} == {p.pid for p in tagged_processes(tag)}
        assert len(tree) == 2 and read_proc(proc.pid) is not None
        t0 = time.monotonic()
        kill_processes(tree, grace_s=0.5)
        assert time.monotonic() - t0 < 5
        assert not any(p.alive() for p in tree)
        assert tagged_processes(tag) == []
    finally:
        proc.kill()
        proc.wait()
    assert marked(mark) == []


def test_owns_listening_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert owns_listening_port(os.getpid(), port) is True
        assert owns_listening_port(1, port) in (False, None)  # None: /proc/1/fd unreadable


def test_superlink_that_cannot_start_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "flower-superlink"
    broken.write_text("#!/bin/sh\necho 'cannot start: no such thing' >&2\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setattr(superlink, "flwr_executable", lambda name: str(broken))
    with pytest.raises(RunnerError, match="exited with code 3"):
        LocalSuperLink(tmp_path / "w").start()


# --------------------------------------------------------------------------- a launcher that dies

#: A stand-in launcher (child Python): starts its watchdog, announces a work dir, starts a
#: ``sleep`` carrying its launcher id, prints the pids and waits for a line; then waits to be
#: killed, or ("release") ends its child and releases the watchdog as a normal end does.
_LAUNCHER = """
import os, subprocess, sys, time
from fedvit.launch.procs import LAUNCHER_VAR, launcher_id
from fedvit.launch.watchdog import Watchdog

dog = Watchdog.start()
dog.remove_on_death(sys.argv[1])
child = subprocess.Popen(["sleep", "300"], env={**os.environ, LAUNCHER_VAR: launcher_id()})
print(dog.proc.pid, child.pid, flush=True)
sys.stdin.readline()  # the test has seen both
if sys.argv[2] == "release":
    child.kill()
    child.wait()
    dog.release()
else:
    time.sleep(300)
"""


def _wait_until(check, timeout: float, what: str) -> float:
    """Poll ``check()`` until true; the seconds it took (AssertionError naming ``what`` after ``timeout``)."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.1)
    return time.monotonic() - t0


def _start_launcher(
    tmp_path: Path, mode: str
) -> tuple[subprocess.Popen[str], runner.Proc, runner.Proc, Path]:
    workdir = tmp_path / "fedvit-work"
    workdir.mkdir()
    (workdir / "superlink.log").write_text("")
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(workdir), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert launcher.stdout is not None
    dog_pid, child_pid = map(int, launcher.stdout.readline().split())
    dog, child = read_proc(dog_pid), read_proc(child_pid)
    assert dog is not None and child is not None
    return launcher, dog, child, workdir


@pytest.mark.timeout(60)
def test_watchdog_kills_what_a_sigkilled_launcher_started_and_removes_its_work_dir(
    tmp_path: Path, mark: str
) -> None:
    launcher, dog, child, workdir = _start_launcher(tmp_path, "wait")
    try:
        time.sleep(0.5)
        assert child.alive() and dog.alive() and workdir.exists()
        launcher.kill()  # SIGKILL: no handler, no finally, nothing of the launcher runs
        launcher.wait(timeout=10)
        _wait_until(lambda: not child.alive() and not workdir.exists(), 20, "teardown by the watchdog")
        _wait_until(lambda: not dog.alive(), 10, "the watchdog's exit")
        assert launcher.stderr is not None
        said = launcher.stderr.read()  # the watchdog inherited it: one line, then it exited
        assert f"reaped 1 process(es) of launcher (pid {launcher.pid}): sleep" in said, said
        assert f"removed {workdir}" in said, said
    finally:
        for p in (child, dog):
            p.signal(signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
    assert marked(mark) == [], describe_procs(marked(mark))


@pytest.mark.timeout(60)
def test_a_released_watchdog_exits_and_touches_nothing(tmp_path: Path, mark: str) -> None:
    launcher, dog, _child, workdir = _start_launcher(tmp_path, "release")
    try:
        assert dog.alive()
        _out, err = launcher.communicate("go\n", timeout=30)
        assert launcher.returncode == 0, err
        assert not dog.alive()  # release() waited for it
        assert workdir.exists()  # a normal end's teardown is the runner's own, not the watchdog's
        assert "reaped" not in err
    finally:
        dog.signal(signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
    assert marked(mark) == [], describe_procs(marked(mark))


def test_reap_orphans_kills_what_a_dead_launcher_left_and_spares_live_launchers(tmp_path: Path) -> None:
    gone = subprocess.Popen(["sleep", "30"])
    dead = procs.launcher_id(gone.pid)  # read while it exists, then it is killed
    gone.kill()
    gone.wait()
    assert not procs.launcher_alive(dead) and procs.launcher_alive(procs.launcher_id())
    workdir = tmp_path / "fedvit-left"
    workdir.mkdir()
    (workdir / "superlink.log").write_text("")
    base = {k: v for k, v in os.environ.items() if k not in (procs.LAUNCHER_VAR, procs.WORKDIR_VAR)}
    orphan = subprocess.Popen(
        ["sleep", "300"], env={**base, procs.LAUNCHER_VAR: dead, procs.WORKDIR_VAR: str(workdir)}
    )
    mine = subprocess.Popen(["sleep", "300"], env={**base, procs.LAUNCHER_VAR: procs.launcher_id()})
    try:
        _wait_until(lambda: proc_environ(orphan.pid).get(procs.LAUNCHER_VAR) == dead, 10, "orphan exec")
        reaped = procs.reap_orphans()
        assert reaped is not None
        assert orphan.wait(timeout=10) is not None and mine.poll() is None
        assert not workdir.exists() and str(workdir) in reaped.workdirs
        assert dead in reaped.launchers and "sleep" in reaped.processes
        assert f"pid {dead.split(':')[0]}" in reaped.line() and str(workdir) in reaped.line()
    finally:
        for p in (orphan, mine):
            p.kill()
            p.wait()


def test_reap_orphans_also_finds_renamed_processes_by_tag_and_by_parent() -> None:
    # Ray's processes rename themselves (setproctitle), which can hide a variable or both from
    # /proc/<pid>/environ: here one has the tag only, another neither (but a reaped parent).
    gone = subprocess.Popen(["sleep", "30"])
    dead = procs.launcher_id(gone.pid)
    gone.kill()
    gone.wait()
    tag = uuid.uuid4().hex
    base = {k: v for k, v in os.environ.items() if k not in (procs.LAUNCHER_VAR, runner.TAG_VAR)}
    parent = subprocess.Popen(
        ["bash", "-c", f"env -u {procs.LAUNCHER_VAR} -u {runner.TAG_VAR} sleep 300 & wait"],
        env={**base, procs.LAUNCHER_VAR: dead, runner.TAG_VAR: tag},
    )
    tag_only = subprocess.Popen(["sleep", "300"], env={**base, runner.TAG_VAR: tag})
    try:
        _wait_until(lambda: len(descendants(parent.pid)) == 2, 10, "the parent's child")
        tree = descendants(parent.pid)
        child = next(p for p in tree if p.pid != parent.pid)
        assert not {procs.LAUNCHER_VAR, runner.TAG_VAR} & set(proc_environ(child.pid))
        reaped = procs.reap_orphans([dead])
        assert reaped is not None and reaped.processes.count("sleep") == 2
        assert not any(p.alive() for p in tree) and tag_only.wait(timeout=10) is not None
    finally:
        for p in (parent, tag_only):
            p.kill()
            p.wait()


def test_a_private_ray_head_takes_the_ray_sizes_out_of_the_federation_config() -> None:
    fed = {"num-supernodes": 4, "init-args-num-cpus": 3, "init-args-num-gpus": 1}
    fed["init-args-logging-level"] = "INFO"
    spec = RayHeadSpec.take_from(fed)
    assert spec == RayHeadSpec(num_cpus=3, num_gpus=1)
    # Ray refuses sizes from a driver that joins a running head; the rest still goes to Flower
    assert fed == {"num-supernodes": 4, "init-args-logging-level": "INFO"}
    cmd = PrivateRayHead(Path("/tmp/r"), Path("/tmp/log"), spec).command("ray", 40001, 40002)
    assert cmd[:4] == ["ray", "start", "--head", "--block"]
    assert {"--port=40001", "--ray-client-server-port=40002", "--num-cpus=3", "--num-gpus=1"} <= set(cmd)
    assert "--temp-dir=/tmp/r" in cmd and "--include-dashboard=false" in cmd
    plain = PrivateRayHead(Path("/tmp/r"), Path("/tmp/log")).command("ray", 40001, 40002)
    assert not any(a.startswith(("--num-cpus", "--num-gpus")) for a in plain)  # Ray detects, as ray.init()


def test_a_ray_head_that_cannot_start_raises_with_its_log_and_stops_the_superlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mark: str
) -> None:
    broken = tmp_path / "ray"
    broken.write_text("#!/bin/sh\necho 'ray: cannot start the head' >&2\nexit 4\n")
    broken.chmod(0o755)
    real = superlink.flwr_executable
    monkeypatch.setattr(superlink, "flwr_executable", lambda n: str(broken) if n == "ray" else real(n))
    link = LocalSuperLink(tmp_path / "w", cwd=tmp_path, ray_head=RayHeadSpec())
    with pytest.raises(RunnerError, match=r"(?s)Ray head exited with code 4.*cannot start the head"):
        link.start()
    assert link.process is not None and link.process.poll() is not None  # the SuperLink went with it
    assert marked(mark) == [], describe_procs(marked(mark))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_superlink_that_retries_another_port_keeps_its_ray_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mark: str
) -> None:
    real, calls = LocalSuperLink._wait_healthy, []

    def first_port_taken(self: LocalSuperLink) -> None:
        calls.append(self.port)
        if len(calls) == 1:
            raise superlink._PortTaken(f"port {self.port} taken")
        real(self)

    monkeypatch.setattr(LocalSuperLink, "_wait_healthy", first_port_taken)
    with local_superlink(cwd=tmp_path, ray_head=RayHeadSpec()) as link:
        assert len(calls) == 2 and calls[0] != calls[1]
        assert link.ray_head is not None and link.ray_head.process is not None
        assert link.ray_head.process.poll() is None  # the retry spared the head the SuperLink points at
        assert link.env()["RAY_ADDRESS"] == link.ray_head.address
        link.ray_head.wait_ready()
    assert marked(mark) == [], describe_procs(marked(mark))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_superlinks_start_side_by_side_and_teardown_leaves_nothing(tmp_path: Path, mark: str) -> None:
    with (
        local_superlink(cwd=tmp_path, ray_head=RayHeadSpec()) as one,
        local_superlink(cwd=tmp_path, ray_head=RayHeadSpec()) as two,
    ):
        assert one.port != two.port
        assert one.ray_head is not None and two.ray_head is not None
        assert one.ray_head.port != two.ray_head.port  # two runs at once never share Ray's defaults
        for link in (one, two):
            assert link.ray_head is not None
            assert link.env()["RAY_ADDRESS"] == link.ray_head.address  # what flwr-simulation inherits
            link.ray_head.wait_ready()  # start() returns while the head may still be starting
            assert any("raylet" in c for c in describe_procs(link.processes()))
        for link in (one, two):
            with urllib.request.urlopen(f"http://{link.address}/health", timeout=5) as resp:
                assert resp.status == 200
            config = (link.flwr_home / "config.toml").read_text()
            assert f'address = "{link.address}"' in config and "insecure = true" in config
            cmds = describe_procs(link.processes())
            assert any("flower-superlink" in c for c in cmds), cmds
            assert any("flower-superexec" in c for c in cmds), cmds
            # Ray's own processes rename themselves (setproctitle), which can hide their environment:
            # they are found as the head's descendants; everything else by the tag
            ray_pids = {p.pid for p in link.ray_head.processes()} - {link.ray_head.process.pid}
            assert all(
                proc_environ(p.pid).get(runner.TAG_VAR) == link.tag
                for p in link.processes()
                if p.pid not in ray_pids
            )
        first_procs, first_dir, first_port = one.processes(), one.workdir, one.port
        one.stop()
        # the first one is gone, process group and all; the second is untouched
        assert not any(p.alive() for p in first_procs)
        assert one.process is not None and one.process.poll() is not None
        with pytest.raises(ProcessLookupError):
            os.killpg(one.process.pid, 0)
        assert runner.listening_inodes(first_port) == set()  # nothing listens there any more
        with urllib.request.urlopen(f"http://{two.address}/health", timeout=5) as resp:
            assert resp.status == 200
    assert not first_dir.exists()
    assert marked(mark) == [], describe_procs(marked(mark))


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_run_completes_with_absolute_paths_and_leaves_nothing(
    tiny_app: Path, tmp_path: Path, mark: str
) -> None:
    log = io.StringIO()
    messages: list[str] = []
    outcome = run_flwr(
        tiny_app,
        {"output-dir": "out", "label": "it's a \\ test"},
        num_supernodes=2,
        cwd=tmp_path,
        timeout_s=200,
        log_sink=log,
        progress=messages.append,
    )
    assert outcome.ok and outcome.status == STATUS_COMPLETED, runner.describe(outcome, 30)
    assert outcome.returncode == 0 and outcome.run_id
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["w"] == [2.0, 2.0, 2.0]  # 2 rounds of +1
    assert result["output-dir"] == str(tmp_path / "out")  # absolute when it reached the ServerApp
    assert result["cwd"] == str(tmp_path)  # the SuperLink runs in the caller's directory
    assert result["label"] == "it's a \\ test"
    assert "ROUND 2/2" in log.getvalue() and "\x1b[" not in log.getvalue()
    assert any("submitted" in m for m in messages)
    # the simulation joined the private Ray head started beside the SuperLink
    head = [m.split("Ray head at ")[1].rstrip(")") for m in messages if "Ray head at " in m]
    assert len(head) == 1, messages
    assert result["ray_gcs"].split(":")[-1] == head[0].split(":")[-1]
    assert marked(mark) == [], describe_procs(marked(mark))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_timeout_stops_the_run_and_leaves_nothing(tiny_app: Path, tmp_path: Path, mark: str) -> None:
    t0 = time.monotonic()
    # Flower's own Ray start (no private head): its teardown leaves nothing either
    outcome = run_flwr(
        tiny_app,
        {"sleep": 120.0},
        num_supernodes=2,
        cwd=tmp_path,
        timeout_s=15,
        stream=False,
        private_ray_head=False,
    )
    assert outcome.status == "timeout" and outcome.returncode == 124 and not outcome.ok
    assert time.monotonic() - t0 < 40
    assert marked(mark) == [], describe_procs(marked(mark))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_during_a_run_tears_down(tiny_app: Path, tmp_path: Path, mark: str) -> None:
    # run_flwr in a child Python, SIGTERM to that process alone once the simulation runs.
    code = textwrap.dedent(
        f"""
        from fedvit.runner import run_flwr
        run_flwr({str(tiny_app)!r}, {{"sleep": 120.0}}, num_supernodes=2, stream=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, start_new_session=True)
    try:
        _wait_for_cmd(mark, "flwr-simulation", 90)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert marked(mark) == [], describe_procs(marked(mark))


def _wait_for_cmd(mark: str, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(needle in c for c in describe_procs(marked(mark))):
            return
        time.sleep(0.2)
    raise AssertionError(f"no '{needle}' process within {timeout}s: {describe_procs(marked(mark))}")


def _fedvit_run(tiny_app: Path, cwd: Path, *run_config: str) -> list[str]:
    """The ``fedvit run`` command line of this environment for the tiny app (2 SuperNodes)."""
    cmd = [str(Path(sys.executable).parent / "fedvit"), "run", str(tiny_app)]
    for item in run_config:
        cmd += ["-c", item]
    return [*cmd, "--federation-config", "num-supernodes=2"]


def _start_sleeping_run(
    tiny_app: Path, tmp_path: Path, mark: str
) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """A real ``fedvit run`` whose ServerApp sleeps 120 s, once its simulation and Ray run: the launcher
    and its SuperLink's environment (tag, launcher id, work dir)."""
    launcher = subprocess.Popen(
        _fedvit_run(tiny_app, tmp_path, "sleep=120.0"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # signals go to the launcher alone
    )
    _wait_for_cmd(mark, "raylet", 90)  # the run's Ray head (started beside the SuperLink) is up
    _wait_for_cmd(mark, "flwr-simulation", 60)  # and the simulation runs
    link = [p for p in marked(mark) if "flower-superlink" in " ".join(describe_procs([p]))]
    assert len(link) == 1, describe_procs(marked(mark))
    env = proc_environ(link[0].pid)
    assert env[procs.LAUNCHER_VAR].split(":")[0] == str(launcher.pid)
    assert Path(env[procs.WORKDIR_VAR]).is_dir()
    return launcher, env


def _left_of(env: dict[str, str]) -> list[runner.Proc]:
    """Live processes of the run whose SuperLink has environment ``env``: by its tag or launcher,
    and their descendants (Ray's renamed processes may no longer show either variable)."""
    found = {p.pid: p for p in tagged_processes(env[runner.TAG_VAR])}
    found.update((p.pid, p) for p in tagged_processes(env[procs.LAUNCHER_VAR], procs.LAUNCHER_VAR))
    snapshot = runner.all_procs()
    for p in list(found.values()):
        found.update((d.pid, d) for d in descendants(p.pid, snapshot))
    return list(found.values())


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_sigkill_of_the_launcher_leaves_nothing_running(tiny_app: Path, tmp_path: Path, mark: str) -> None:
    # What a CI timeout or the OOM killer does: no handler runs in the launcher; its watchdog acts.
    launcher, env = _start_sleeping_run(tiny_app, tmp_path, mark)
    try:
        assert len(_left_of(env)) >= 6  # SuperLink, SuperExec, simulation, Ray (GCS, raylet ...), flwr CLI
        launcher.kill()
        launcher.wait(timeout=10)
        _wait_until(lambda: not _left_of(env), 30, f"teardown: {describe_procs(_left_of(env))}")
        _wait_until(lambda: not Path(env[procs.WORKDIR_VAR]).exists(), 10, "work dir removal")
        _wait_until(lambda: not marked(mark), 10, f"all gone: {describe_procs(marked(mark))}")
    finally:
        if launcher.poll() is None:
            launcher.kill()
        kill_processes(marked(mark), grace_s=1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_next_run_reaps_what_a_dead_launcher_and_its_dead_watchdog_left(
    tiny_app: Path, tmp_path: Path, mark: str
) -> None:
    launcher, env = _start_sleeping_run(tiny_app, tmp_path, mark)
    try:
        dogs = [p for p in marked(mark) if "fedvit.launch.watchdog" in " ".join(describe_procs([p]))]
        assert len(dogs) == 1, describe_procs(marked(mark))
        dogs[0].signal(signal.SIGKILL)
        launcher.kill()
        launcher.wait(timeout=10)
        time.sleep(3)
        left = _left_of(env)
        assert any("flower-superlink" in c for c in describe_procs(left))  # headless, for good
        res = subprocess.run(
            _fedvit_run(tiny_app, tmp_path, "output-dir=out"),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=200,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        said = [line for line in res.stderr.splitlines() if "reaped" in line]
        assert len(said) == 1, res.stderr[-3000:]
        assert re.search(rf"dead fedvit launcher\(s\) \(pid [0-9, ]*\b{launcher.pid}\b", said[0]), said[0]
        assert all(
            name in said[0] for name in ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet")
        )
        assert f"removed {env[procs.WORKDIR_VAR]}" in said[0]
        assert not any(p.alive() for p in left), describe_procs([p for p in left if p.alive()])
        assert not Path(env[procs.WORKDIR_VAR]).exists(), list(Path(env[procs.WORKDIR_VAR]).rglob("*"))[:20]
        assert (tmp_path / "out" / "result.json").is_file()  # and the run itself went as usual
    finally:
        if launcher.poll() is None:
            launcher.kill()
        kill_processes(marked(mark), grace_s=1)
    assert marked(mark) == [], describe_procs(marked(mark))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_named_superlink_is_used_as_is(tiny_app: Path, tmp_path: Path, mark: str) -> None:
    # Deployment path: submit to an existing connection of a FLWR_HOME. Here that SuperLink is
    # one we start ourselves; run_flwr must start nothing and pass paths through unchanged.
    server_cwd = tmp_path / "server"
    server_cwd.mkdir()
    with local_superlink(cwd=server_cwd) as link:
        superlinks_seen: list[int] = []  # flower-superlink processes each time run_flwr reports progress

        def count_superlinks(_msg: str) -> None:
            superlinks_seen.append(sum("flower-superlink" in c for c in describe_procs(marked(mark))))

        outcome = run_flwr(
            tiny_app,
            {"output-dir": "out"},
            num_supernodes=2,
            superlink=link.connection,
            flwr_home=link.flwr_home,
            cwd=tmp_path,
            timeout_s=200,
            stream=False,
            progress=count_superlinks,
        )
        assert outcome.ok, runner.describe(outcome, 30)
        assert outcome.superlink == link.connection
        assert outcome.run_config == {"output-dir": "out"}  # a path on the SuperLink's machine
        result = json.loads((server_cwd / "out" / "result.json").read_text())
        assert result["output-dir"] == "out" and result["cwd"] == str(server_cwd)
        assert superlinks_seen and set(superlinks_seen) == {1}  # run_flwr started none of its own
    assert marked(mark) == [], describe_procs(marked(mark))


def test_flower_and_ray_notices_that_do_not_apply_are_left_out_of_the_echoed_log() -> None:
    from fedvit.runner import is_noise

    noise = [
        "WARNING :   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.",
        "INFO :      \tflwr federation simulation-config @none/default <superlink> --num-supernodes <N>",
        "/x/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray, Ray will no longer "
        "override accelerator visible devices env var if num_gpus=0",
        "  warnings.warn(",
    ]
    kept = [
        "INFO :      [fedvit] round 1/2 | 1.1s | train loss 2.25",
        "ERROR :     ClientApp raised an exception",
    ]
    assert all(is_noise(line) for line in noise)
    assert not any(is_noise(line) for line in kept)


def test_a_primed_flwr_runs_what_the_flwr_script_runs_and_an_unused_one_just_ends(tmp_path: Path) -> None:
    env = runner.flwr_env(tmp_path / "home")
    direct = runner._flwr(["--version"], env, tmp_path, 120)
    primed = runner.PrimedFlwr(runner.flwr_env(), tmp_path)  # the call's env wins over the spawn's
    via = primed.run(["--version"], env, 120)
    assert (via.returncode, via.stdout, via.stderr) == (direct.returncode, direct.stdout, direct.stderr)
    assert direct.returncode == 0 and "1.41" in direct.stdout

    unused = runner.PrimedFlwr(env, tmp_path)
    unused.close()  # stdin closed: it exits by itself, without running anything
    assert unused.proc.returncode == 0


def test_a_local_simulation_warms_its_workers_and_gives_the_serverapp_one_thread(monkeypatch) -> None:
    from fedvit.launch.prepare import RAY_NO_PRESTART

    for var in ("OMP_NUM_THREADS", runner.RAY_HOOK_VAR, RAY_NO_PRESTART):
        monkeypatch.delenv(var, raising=False)
    warm = {runner.RAY_HOOK_VAR: "fedvit.warmup.ray_runtime_env", RAY_NO_PRESTART: "0"}
    assert runner.local_simulation_env(1) == {**warm, "OMP_NUM_THREADS": "1"}
    assert runner.local_simulation_env(2) == warm
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # what the user's environment sets wins
    monkeypatch.setenv(runner.RAY_HOOK_VAR, "my.hook")
    monkeypatch.setenv(RAY_NO_PRESTART, "1")
    assert runner.local_simulation_env(1) == {}
