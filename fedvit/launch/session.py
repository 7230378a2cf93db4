"""One run's conversation with a SuperLink through the ``flwr`` CLI: submit (``flwr run``), stream
the log (``flwr log --stream``), poll the final status (``flwr ls``), stop on timeout; and the
outcome (:class:`RunOutcome`)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from fedvit.launch.errors import RunnerError
from fedvit.launch.superlink import flwr_executable

if TYPE_CHECKING:
    from fedvit.launch.superlink import LocalSuperLink

STATUS_COMPLETED = "finished:completed"
#: Pseudo statuses for runs that never reached a final Flower status.
STATUS_NOT_SUBMITTED = "not-submitted"
STATUS_TIMEOUT = "timeout"
STATUS_UNKNOWN = "unknown"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_TIMEOUT = 124


@dataclass
class RunOutcome:
    """What became of one ``flwr run``."""

    run_id: str | None
    status: str  # Flower's final status ("finished:completed", "finished:failed" ...) or a pseudo one
    details: str  # Flower's status details, or what went wrong before there was a status
    returncode: int  # the exit code a command line should use: 0, 1, or 124 (timeout)
    run_config: dict[str, Any] = field(default_factory=dict)  # as submitted
    output_dir: Path | None = None  # where a fedvit ServerApp writes this run's results
    superlink: str = ""  # connection name and address the run went to
    elapsed_s: float = 0.0
    log_tail: list[str] = field(default_factory=list)  # last lines of the run's log stream

    @property
    def ok(self) -> bool:
        return self.status == STATUS_COMPLETED


# --------------------------------------------------------------------------- status

_FINAL_PREFIX = "finished"


def parse_ls_json(text: str, run_id: str | None = None) -> tuple[str, str]:
    """``(status, details)`` from ``flwr ls --run-id ID --format json`` output.

    Raises :class:`RunnerError` when the output is not a successful listing of the run.
    """
    try:
        data = json.loads(_json_part(text))
    except ValueError as err:
        raise RunnerError(f"flwr ls: not JSON: {text.strip()[:300]!r}") from err
    if not data.get("success", False):
        raise RunnerError(f"flwr ls failed: {data.get('error-message', data)}")
    runs = data.get("runs") or []
    if run_id is not None:
        runs = [r for r in runs if str(r.get("run-id")) == str(run_id)]
    if not runs:
        raise RunnerError(f"flwr ls: run {run_id} not listed")
    run = runs[0]
    details = str(run.get("status-details", ""))
    return str(run.get("status", STATUS_UNKNOWN)), "" if details == "N/A" else details


def is_final(status: str) -> bool:
    return status.startswith(_FINAL_PREFIX)


def parse_submit_json(text: str) -> str:
    """The run id from ``flwr run --format json`` output; :class:`RunnerError` if none."""
    try:
        data = json.loads(_json_part(text))
    except ValueError as err:
        raise RunnerError(f"flwr run: not JSON: {text.strip()[:500]!r}") from err
    if not data.get("success") or not data.get("run-id"):
        raise RunnerError(f"flwr run failed: {data.get('error-message', data)}")
    return str(data["run-id"])


def _json_part(text: str) -> str:
    """The JSON object in ``text`` (Flower may print a line or two before it)."""
    start = text.find("{")
    return text[start:] if start >= 0 else text


def _flwr(
    args: list[str], env: Mapping[str, str], cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [flwr_executable("flwr"), *args],
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


#: The ``flwr`` console script (``flwr.cli.app:app``), imported ahead of time: it waits for one line
#: ``{"argv": [...], "env": {...}}`` on stdin, then runs as ``flwr ARGV`` would in that environment
#: (the app's FAB from the same files, collected faster: :mod:`fedvit.launch.fab`).
#: An empty stdin (the runner went away) ends it.
_PRIMED_FLWR = """
import json, os, sys
from flwr.cli.app import app
from fedvit.launch.fab import install
install()  # `flwr run` collects the app's files without walking .venv and other dropped dirs
line = sys.stdin.readline()
if not line.strip():
    sys.exit(0)
job = json.loads(line)
os.environ.clear()
os.environ.update(job["env"])
sys.argv = ["flwr", *job["argv"]]
sys.exit(app())
"""


class PrimedFlwr:
    """A ``flwr`` CLI process started before it is needed, so that starting Python and importing
    Flower's CLI (1-3 s, more on a busy machine) overlaps with other work: the SuperLink's start
    for ``flwr run``, the run itself for the final ``flwr ls``. The same program and arguments as
    the ``flwr`` console script; used once."""

    def __init__(self, env: Mapping[str, str], cwd: Path) -> None:
        self.cwd = cwd
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PRIMED_FLWR],
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(
        self, args: list[str], env: Mapping[str, str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """``flwr ARGS`` in ``env``: as :func:`_flwr`, raising ``TimeoutExpired`` after ``timeout``."""
        job = json.dumps({"argv": list(args), "env": dict(env)}) + "\n"
        try:
            out, err = self.proc.communicate(job, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise
        return subprocess.CompletedProcess(["flwr", *args], self.proc.returncode, out, err)

    def close(self) -> None:
        """End it if unused (its stdin closes) or stuck."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


#: Lines of Flower's and Ray's run log that say nothing about a fedvit run (the runner chooses the
#: number of simulated SuperNodes itself, and hides GPUs from CPU-only clients on purpose): not
#: echoed; one line says they were left out. Every line still goes to the kept tail.
LOG_NOISE = (
    re.compile(r"default simulated SuperNodes changed from"),
    re.compile(r"To change federation size, use the following command"),
    re.compile(r"flwr federation simulation-config"),
    re.compile(r"FutureWarning: Tip: In future versions of Ray, Ray will no longer override accelerator"),
    re.compile(r"^\s*warnings\.warn\(\s*$"),
)
NOISE_NOTE = (
    "fedvit: (left out of this log: Flower's federation-size hints, which do not apply because fedvit "
    "sets num-supernodes, and Ray's notice about GPU visibility, which fedvit relies on)\n"
)


def is_noise(line: str) -> bool:
    """A log line from :data:`LOG_NOISE`."""
    return any(p.search(line) for p in LOG_NOISE)


class _LogPump:
    """``flwr log <id> --stream`` in the background: echoes lines (without :data:`LOG_NOISE`, noted
    once) and keeps the last ones."""

    def __init__(
        self, cmd: list[str], env: Mapping[str, str], cwd: Path, sink: TextIO | None, keep: int = 40
    ):
        self.tail: deque[str] = deque(maxlen=keep)
        self.sink = sink
        self.proc = subprocess.Popen(
            cmd,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        plain = self.sink is not None and not _isatty(self.sink)
        noted = False
        for line in self.proc.stdout:
            self.tail.append(strip_ansi(line.rstrip("\n")))
            if is_noise(strip_ansi(line)):
                if not noted and self.sink is not None:
                    noted = True
                    with contextlib.suppress(Exception):
                        self.sink.write(NOISE_NOTE)
                continue
            if self.sink is not None:
                with contextlib.suppress(Exception):
                    self.sink.write(strip_ansi(line) if plain else line)
                    self.sink.flush()

    def wait(self, timeout: float | None) -> bool:
        """True when the stream ended within ``timeout`` seconds."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        self.thread.join(timeout=5)
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.thread.join(timeout=5)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes."""
    return _ANSI.sub("", text)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


@dataclass
class _Session:
    """Talks to one SuperLink connection with the ``flwr`` CLI for one run."""

    connection: str
    env: Mapping[str, str]
    cwd: Path
    deadline: float | None
    remote: bool
    status_timeout_s: float
    say: Callable[[str], None]
    link: LocalSuperLink | None = None  # the SuperLink started for this run, if any
    primed: PrimedFlwr | None = None  # a flwr CLI started ahead, for the next call (see flwr())

    def superlink_alive(self) -> bool:
        return self.link is None or (self.link.process is not None and self.link.process.poll() is None)

    def superlink_log(self) -> str:
        return self.link.log_tail(20) if self.link is not None else ""

    def flwr(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """``flwr ARGS``: in the primed process if one is waiting (then it is used up)."""
        primed, self.primed = self.primed, None
        if primed is not None:
            try:
                return primed.run(args, self.env, timeout)
            finally:
                primed.close()
        return _flwr(args, self.env, self.cwd, timeout)

    def submit_and_wait(self, run_args: list[str], sink: TextIO | None, outcome: RunOutcome) -> None:
        remaining = _remaining(self.deadline)
        if remaining is not None and remaining <= 0:
            self.timeout(outcome)
            return
        submit_timeout = 300.0 if remaining is None else min(300.0, remaining)
        try:
            res = self.flwr(run_args, submit_timeout)
        except subprocess.TimeoutExpired:
            outcome.status, outcome.returncode = STATUS_TIMEOUT, EXIT_TIMEOUT
            outcome.details = f"flwr run did not return within {submit_timeout:.0f}s"
            return
        try:
            outcome.run_id = parse_submit_json(res.stdout)
        except RunnerError as err:
            outcome.details = f"{err}\n{res.stderr.strip()}".strip()
            return
        outcome.status = "submitted"
        self.say(f"run {outcome.run_id} submitted to {self.connection}")
        self.primed = PrimedFlwr(self.env, self.cwd)  # for the final `flwr ls`, ready when the run ends

        pump = None
        try:
            cmd = [flwr_executable("flwr"), "log", outcome.run_id, self.connection, "--stream"]
            pump = _LogPump(cmd, self.env, self.cwd, sink)
            if self.link is not None and self.link.ray_head is not None:
                # started beside the SuperLink, joined by the simulation as soon as it is up: a head
                # that fails is reported here, with its log, not as the driver's connection timeout
                left = _remaining(self.deadline)
                self.link.ray_head.wait_ready(timeout_s=120.0 if left is None else max(0.0, min(120.0, left)))
            # The log stream ends when the run ends (or the SuperLink goes away).
            if not pump.wait(_remaining(self.deadline)):
                self.timeout(outcome)
                return
            self.wait_final_status(outcome)
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM): a remote SuperLink is asked to stop the run; a local
            # one is torn down right after, which ends the run anyway.
            if self.remote:
                self.stop_run(outcome.run_id)
            raise
        finally:
            if pump is not None:
                pump.stop()
                outcome.log_tail = list(pump.tail)
            if self.primed is not None:
                self.primed.close()
                self.primed = None

    def wait_final_status(self, outcome: RunOutcome) -> None:
        """Poll ``flwr ls`` until the run's status is final.

        The status turns final seconds after the log stream ends; if the stream ended early
        (a dropped connection) the run may still be going: polling goes on, slower, until the
        run's deadline. Only ``status_timeout_s`` of failed queries in a row give up, and a
        local SuperLink that died gives up at once.
        """
        assert outcome.run_id is not None
        started = last_ok = time.monotonic()
        status, details, error = STATUS_UNKNOWN, "", ""
        while True:
            try:
                ls = self.flwr(["ls", "--run-id", outcome.run_id, self.connection, "--format", "json"], 60)
                status, details = parse_ls_json(ls.stdout, outcome.run_id)
                last_ok = time.monotonic()
            except (RunnerError, subprocess.TimeoutExpired) as err:
                error = str(err)
            if is_final(status):
                break
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline:
                self.timeout(outcome)
                return
            if now - last_ok >= self.status_timeout_s or not self.superlink_alive():
                outcome.status = status
                outcome.details = f"cannot get the run's final status: {error or status}"
                if not self.superlink_alive():
                    outcome.details = f"the SuperLink exited during the run:\n{self.superlink_log()}"
                return
            if self.primed is None and now - started < 30:  # the next query without a cold start
                self.primed = PrimedFlwr(self.env, self.cwd)
            time.sleep(0.5 if now - started < 30 else 5.0)
        outcome.status, outcome.details = status, details
        outcome.returncode = EXIT_OK if status == STATUS_COMPLETED else EXIT_FAILED

    def timeout(self, outcome: RunOutcome) -> None:
        outcome.status, outcome.returncode = STATUS_TIMEOUT, EXIT_TIMEOUT
        outcome.details = "the run did not finish within the timeout" + (
            "; it was stopped" if outcome.run_id else ""
        )
        if self.remote:  # a local SuperLink is torn down right after, with the run
            self.stop_run(outcome.run_id)

    def stop_run(self, run_id: str | None) -> None:
        if run_id is None:
            return
        self.say(f"stopping run {run_id}")
        with contextlib.suppress(Exception):
            self.flwr(["stop", run_id, self.connection], 30)


def describe(outcome: RunOutcome, log_lines: int = 0) -> str:
    """A few lines for people: status, details, where the results are (or were to be)."""
    lines = [f"run {outcome.run_id or '-'}: {outcome.status} ({outcome.elapsed_s:.1f}s)"]
    if outcome.details:
        lines.append(f"details: {outcome.details}")
    if outcome.output_dir is not None:
        lines.append(f"results: {outcome.output_dir}")
    if log_lines and outcome.log_tail:
        lines.append("last log lines:")
        lines += [f"  {line}" for line in outcome.log_tail[-log_lines:]]
    return "\n".join(lines)
