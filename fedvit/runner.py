"""Run a Flower app with ``flwr run`` and fail loudly: the engine behind ``fedvit run``.

``flwr run`` alone has three traits that make it a poor batch tool: it exits 0 even when the
run failed, it needs a SuperLink (the ``:local:`` address spawns a detached one that outlives
the run, on fixed ports), and it interprets relative paths in the run config against the
SuperLink's working directory. :func:`run_flwr` wraps it:

1. The run config is parsed and checked here first (for a fedvit app: composed and validated
   with :func:`fedvit.config.load_config`), so a typo fails in well under a second with one
   :class:`~fedvit.config.ConfigError`, not inside Ray. Relative ``data-dir`` / ``output-dir``
   / ``resume`` paths become absolute against the caller's working directory, and a
   ``run-name`` is chosen when none is given, so the caller knows where the results go.
2. Unless ``superlink`` names an existing connection, a private SuperLink is started
   (:class:`LocalSuperLink`): its own ``FLWR_HOME`` with a ``config.toml`` that points at it,
   a free port, its own database and Ray temp dir. Two runs at once do not collide.
3. The run is submitted (``flwr run <app> <connection> --format json``), its logs are streamed
   (``flwr log <id> --stream``), and the final status comes from ``flwr ls --run-id <id>``.
   Anything but ``finished:completed`` is a failure (:attr:`RunOutcome.ok` is false).
4. The SuperLink and everything it started (SuperExec, ``flwr-simulation``, the Ray cluster and
   its workers) are torn down on every exit path: success, failure, timeout, Ctrl-C, SIGTERM.
   Processes are found by an environment tag they all inherit, not by their process group
   (SuperExec starts its own session).

Deployment: ``superlink="<name>"`` submits to a connection of the caller's ``FLWR_HOME``
``config.toml`` (remote address, TLS root certificate ...); nothing is started, nothing is
killed, and paths are passed as given (they are paths on the SuperLink's machine).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from fedvit.config import ConfigError
from fedvit.warmup import RUNTIME_ENV_HOOK

# --------------------------------------------------------------------------- constants

#: Set for every ``flwr`` / ``flower-*`` process the runner starts (the three are read by Flower).
FLWR_ENV: dict[str, str] = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else `uv sync` over the network
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
#: Every process of a runner-started SuperLink inherits this variable (value: a random tag);
#: teardown finds them by it, whatever process group or session they moved to.
TAG_VAR = "FEDVIT_RUNNER_TAG"
#: Name of the SuperLink connection the runner writes into its private ``config.toml``.
LOCAL_CONNECTION = "fedvit-local"
#: Ports that Flower, Ray or their CLIs use by default: never handed out as "free".
RESERVED_PORTS = frozenset({6379, 8000, 8265, 9091, 9092, 9093, 9094, 9095, 10001, 39091, 39093, 52365})

#: Run-config keys that hold local paths (made absolute against the caller's cwd).
PATH_KEYS = ("data-dir", "output-dir", "resume")
#: Dotted config keys that hold local paths, when they appear in the ``overrides`` dotlist.
#: (``data.path`` is not here: a relative one is relative to ``data.data_dir``.)
PATH_DOTKEYS = (
    "data.data_dir",
    "data.cache_dir",
    "output.dir",
    "server.resume",
    "clients.state_dir",
    "model.pretrained",
)
#: ``--federation-config`` keys Flower 1.41 knows (SimulationConfig, with ``-`` for ``_``).
FEDERATION_CONFIG_KEYS = (
    "num-supernodes",
    "client-resources-num-cpus",
    "client-resources-num-gpus",
    "backend",
    "verbose",
    "init-args-num-cpus",
    "init-args-num-gpus",
    "init-args-logging-level",
    "init-args-log-to-driver",
)
#: What Ray's ``ray.init()`` reads when called without an address, as Flower's RayBackend calls
#: it: ``HOST:PORT`` of a running cluster's head. Set for the simulation by ``ray_address``.
RAY_ADDRESS_VAR = "RAY_ADDRESS"
#: Read by ``ray.init``: a function that edits the runtime env (fedvit's adds a worker warm-up).
RAY_HOOK_VAR = "RAY_RUNTIME_ENV_HOOK"
#: ``--federation-config`` keys Ray refuses when it joins a running cluster (each node declared
#: its resources with ``ray start --num-cpus/--num-gpus``).
CLUSTER_REFUSED_KEYS = ("init-args-num-cpus", "init-args-num-gpus")

STATUS_COMPLETED = "finished:completed"
#: Pseudo statuses for runs that never reached a final Flower status.
STATUS_NOT_SUBMITTED = "not-submitted"
STATUS_TIMEOUT = "timeout"
STATUS_UNKNOWN = "unknown"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_TIMEOUT = 124


class RunnerError(RuntimeError):
    """The machinery around a run broke (SuperLink did not start, ``flwr`` missing ...)."""


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


# --------------------------------------------------------------------------- config strings

# Flower's own `--run-config` tokenizer (flwr.common.config.parse_config_args).
_PAIR = re.compile(r"""\s*(\S+?)=('[^']*'|"[^"]*"|\S+)""")


def parse_kv_string(text: str, what: str = "run-config") -> dict[str, Any]:
    """Parse ``'k1=v1 k2="a b" k3=2'`` the way Flower does (values are TOML).

    Friendlier than Flower in two ways: a bare word that is not TOML is a string
    (``method=fedper``), and text that is not a ``key=value`` pair is an error instead of
    being dropped silently.
    """
    out: dict[str, Any] = {}
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _PAIR.match(text, pos)
        if m is None or (m.end() < len(text) and not text[m.end()].isspace()):
            rest = text[pos:].strip().split()[0]
            raise ConfigError(f"{what}: cannot parse '{rest}' (expected key=value pairs, e.g. \"a=1 b='x'\")")
        key, raw = m.group(1), m.group(2)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            if raw[0] in "'\"":
                raise ConfigError(f"{what}: invalid value for '{key}': {raw}") from None
            value = raw
        if isinstance(value, dict | list):
            raise ConfigError(f"{what}: '{key}' must be a bool, int, float or string, got {raw}")
        out[key] = value
        pos = m.end()
    return out


def load_kv_args(args: list[str] | None, what: str = "run-config") -> dict[str, Any]:
    """Merge repeated ``--run-config`` arguments: each ``k=v ...`` text or a ``.toml`` file."""
    out: dict[str, Any] = {}
    for arg in args or []:
        if arg.strip().endswith(".toml") and "=" not in arg:
            path = Path(arg.strip()).expanduser()
            try:
                data = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as err:
                raise ConfigError(f"{what}: cannot read {path}: {err}") from err
            out.update(_flatten(data))
        else:
            out.update(parse_kv_string(arg, what))
    return out


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def toml_value(value: Any, key: str = "value") -> str:
    """One value in the TOML syntax Flower's ``--run-config`` tokenizer accepts.

    Strings go in single quotes (TOML literal strings: backslashes stay as they are), or in
    double quotes with TOML escapes when they hold a single quote. A string with both quote
    characters or a newline cannot pass Flower's tokenizer: :class:`ConfigError`.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        if "\n" in value or "\r" in value:
            raise ConfigError(f"run-config '{key}': a value cannot hold a line break")
        if "'" not in value:
            return f"'{value}'"
        if '"' not in value:
            return '"' + value.replace("\\", "\\\\") + '"'
        raise ConfigError(f"run-config '{key}': a value cannot hold both ' and \" ({value!r})")
    raise ConfigError(f"run-config '{key}': must be a bool, int, float or string, got {type(value).__name__}")


def format_kv(config: Mapping[str, Any], what: str = "run-config") -> str:
    """``{'a': 1, 'b': 'x y'}`` -> ``"a=1 b='x y'"``, safe for Flower's parser."""
    parts = []
    for key, value in config.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise ConfigError(f"{what}: invalid key {key!r}")
        parts.append(f"{key}={toml_value(value, key)}")
    return " ".join(parts)


def format_run_config(run_config: Mapping[str, Any]) -> str:
    """A run config as one ``--run-config`` argument (``None`` values are left out)."""
    return format_kv({k: v for k, v in run_config.items() if v is not None})


def absolutize_paths(run_config: Mapping[str, Any], cwd: str | Path | None = None) -> dict[str, Any]:
    """Copy of ``run_config`` with relative local paths made absolute against ``cwd``.

    Covers :data:`PATH_KEYS` and, inside ``overrides``, the :data:`PATH_DOTKEYS` items.
    ``""`` (= not set) stays ``""``; ``~`` is expanded.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()

    def fix(path: str) -> str:
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    out = dict(run_config)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value:
            out[key] = fix(value)
    overrides = out.get("overrides")
    if isinstance(overrides, str) and overrides:
        items = []
        for item in overrides.split():
            key, sep, value = item.partition("=")
            if (
                sep
                and key.lstrip("+~") in PATH_DOTKEYS
                and value
                and value[0] not in "'\""
                and value != "null"
                and not value.startswith("timm:")  # model.pretrained='timm:<name>' names no file
            ):
                item = f"{key}={fix(value)}"
            items.append(item)
        out["overrides"] = " ".join(items)
    return out


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


# --------------------------------------------------------------------------- processes


def find_free_port(host: str = "127.0.0.1", exclude: frozenset[int] | set[int] = frozenset()) -> int:
    """A TCP port nothing listens on now (the kernel's pick), never a Flower/Ray default."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in RESERVED_PORTS and port not in exclude:
            return port
    raise RunnerError("no free TCP port found")


def bin_dir() -> Path:
    """The directory of this interpreter's console scripts (``flwr``, ``flower-superlink`` ...)."""
    return Path(sys.executable).parent


def flwr_executable(name: str) -> str:
    """Path of a Flower console script: beside this interpreter, else on PATH."""
    local = bin_dir() / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise RunnerError(f"'{name}' not found (is flwr[simulation] installed in this environment?)")
    return found


def flwr_env(flwr_home: str | Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for ``flwr`` commands: the Flower switches, PATH with our bin dir first."""
    env = dict(os.environ)
    env.update(FLWR_ENV)
    env["PATH"] = os.pathsep.join([str(bin_dir()), env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass(frozen=True)
class Proc:
    """A process seen in ``/proc``: pid plus start time (so a reused pid is never mistaken)."""

    pid: int
    ppid: int
    start: int  # clock ticks after boot
    state: str  # R, S, D, Z ...

    def alive(self) -> bool:
        now = read_proc(self.pid)
        return now is not None and now.start == self.start and now.state not in "ZX"

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, sig)


def read_proc(pid: int) -> Proc | None:
    """``/proc/<pid>/stat`` parsed, or ``None`` when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return Proc(pid=pid, ppid=int(fields[1]), start=int(fields[19]), state=fields[0])


def all_procs() -> list[Proc]:
    """Every process in ``/proc`` (Linux). Elsewhere: none, and teardown falls back to the
    SuperLink's process group alone."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    out = []
    for entry in entries:
        if entry.isdigit():
            proc = read_proc(int(entry))
            if proc is not None:
                out.append(proc)
    return out


def proc_environ(pid: int) -> dict[str, str]:
    """A process's environment (empty when unreadable: another user's, or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def tagged_processes(tag: str) -> list[Proc]:
    """Live processes whose environment has ``FEDVIT_RUNNER_TAG=<tag>`` (never this one)."""
    me = os.getpid()
    return [
        p
        for p in all_procs()
        if p.pid != me and p.state not in "ZX" and proc_environ(p.pid).get(TAG_VAR) == tag
    ]


def descendants(pid: int, procs: list[Proc] | None = None) -> list[Proc]:
    """``pid`` itself and all its live descendants."""
    procs = all_procs() if procs is None else procs
    children: dict[int, list[Proc]] = {}
    root = None
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
        if p.pid == pid:
            root = p
    if root is None:
        return []
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p.state not in "ZX":
            out.append(p)
        todo.extend(children.get(p.pid, []))
    return out


def kill_processes(procs: list[Proc], grace_s: float = 3.0) -> None:
    """SIGTERM ``procs``, wait up to ``grace_s``, SIGKILL what is left (never this process)."""
    me = os.getpid()
    procs = [p for p in procs if p.pid != me]
    for p in procs:
        p.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.alive() for p in procs):
        time.sleep(0.1)
    for p in procs:
        p.signal(signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(p.alive() for p in procs):
        time.sleep(0.05)


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (IPv4 and IPv6), from ``/proc/net``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    return inodes


def owns_listening_port(pid: int, port: int) -> bool | None:
    """Whether ``pid`` holds the socket listening on ``port``; ``None`` if it cannot be told."""
    inodes = listening_inodes(port)
    if not inodes:
        return None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


# --------------------------------------------------------------------------- the SuperLink


class LocalSuperLink:
    """A private ``flower-superlink --simulation`` on a free loopback port.

    ``workdir`` holds ``flwr-home/config.toml`` (one connection, :data:`LOCAL_CONNECTION`),
    ``state.db``, ``superlink.log`` and the Ray temp dir. Use as a context manager; :meth:`stop`
    tears down the SuperLink and every process that inherited its tag.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        flwr_home: str | Path | None = None,
        host: str = "127.0.0.1",
        env_extra: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        startup_timeout_s: float = 60.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.flwr_home = Path(flwr_home) if flwr_home is not None else self.workdir / "flwr-home"
        self.host = host
        self.port: int | None = None
        self.tag = uuid.uuid4().hex
        self.cwd = Path(cwd) if cwd is not None else Path.cwd()
        self.env_extra = dict(env_extra or {})
        self.startup_timeout_s = startup_timeout_s
        self.log_path = self.workdir / "superlink.log"
        self.ray_tmp = self.workdir / "r"  # short: Ray's unix sockets live below it
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # -- addresses
    @property
    def address(self) -> str:
        if self.port is None:
            raise RunnerError("SuperLink not started")
        return f"{self.host}:{self.port}"

    @property
    def connection(self) -> str:
        return LOCAL_CONNECTION

    def env(self) -> dict[str, str]:
        """Environment for ``flwr`` commands talking to this SuperLink."""
        return flwr_env(self.flwr_home, self.env_extra)

    # -- life cycle
    def start(self) -> LocalSuperLink:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.ray_tmp.mkdir(parents=True, exist_ok=True)
        exe = flwr_executable("flower-superlink")
        tried: set[int] = set()
        last_error = ""
        for _attempt in range(3):
            port = find_free_port(self.host, exclude=tried)
            tried.add(port)
            try:
                self._spawn(exe, port)
                self._wait_healthy()
            except _PortTaken as err:
                last_error = str(err)
                self._stop_process_tree()
                continue
            except BaseException:
                self.stop()
                raise
            self._write_connection()
            return self
        self.stop()
        raise RunnerError(f"flower-superlink did not start: {last_error}")

    def _spawn(self, exe: str, port: int) -> None:
        self.port = port
        env = self.env()
        env[TAG_VAR] = self.tag
        env["RAY_TMPDIR"] = str(self.ray_tmp)
        cmd = [
            exe,
            "--insecure",
            "--simulation",
            "--disable-runtime-dependency-installation",
            "--host",
            self.host,
            "--port",
            str(port),
            "--database",
            str(self.workdir / "state.db"),
        ]
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            cmd,
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our terminal's Ctrl-C is ours to handle, not its
        )

    def _wait_healthy(self) -> None:
        assert self.process is not None and self.port is not None
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.host}:{self.port}/health"
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                tail = self.log_tail(15)
                if "address already in use" in tail.lower() or "errno 98" in tail.lower():
                    raise _PortTaken(f"port {self.port} taken")
                raise RunnerError(f"flower-superlink exited with code {code} while starting:\n{tail}")
            try:
                with urllib.request.urlopen(url, timeout=0.5) as resp:
                    if resp.status == 200 and self._owns_port():
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.2)
        raise RunnerError(
            f"flower-superlink not healthy after {self.startup_timeout_s:.0f}s:\n{self.log_tail(15)}"
        )

    def _owns_port(self) -> bool:
        """The health answer came from our SuperLink, not another one that holds the port."""
        assert self.process is not None and self.port is not None
        return owns_listening_port(self.process.pid, self.port) is not False

    def _write_connection(self) -> None:
        text = (
            "# Written by fedvit.runner for one run: a private SuperLink on a free port.\n"
            "[superlink]\n"
            f'default = "{LOCAL_CONNECTION}"\n\n'
            f"[superlink.{LOCAL_CONNECTION}]\n"
            f'address = "{self.address}"\n'
            "insecure = true\n"
        )
        (self.flwr_home / "config.toml").write_text(text)

    def processes(self) -> list[Proc]:
        """The SuperLink and everything it started (live ones)."""
        procs = {p.pid: p for p in tagged_processes(self.tag)}
        if self.process is not None:
            for p in descendants(self.process.pid):
                procs.setdefault(p.pid, p)
        procs.pop(os.getpid(), None)
        return list(procs.values())

    def _stop_process_tree(self, grace_s: float = 3.0) -> None:
        # The SuperLink's own group first (it was started in a new session: pgid == pid),
        # then every tagged process wherever it lives; repeat while new ones show up.
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(self.process.pid) != os.getpgid(0):
                    os.killpg(self.process.pid, signal.SIGTERM)
        for _round in range(5):
            procs = self.processes()
            if not procs:
                break
            kill_processes(procs, grace_s=grace_s)
            grace_s = 1.0
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if self.process.poll() is None:
                    os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)

    def stop(self) -> None:
        """Tear down the SuperLink and all it started. Idempotent; Ctrl-C / SIGTERM wait for it."""
        try:
            with _deferred_signals():
                self._stop_process_tree()
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def __enter__(self) -> LocalSuperLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _PortTaken(RunnerError):
    pass


class _Terminated(SystemExit):
    """SIGTERM / SIGHUP turned into an exception, so that teardown runs."""


@contextlib.contextmanager
def _deferred_signals() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP until the block is done (a teardown must not be cut short).

    A signal that came meanwhile is raised afterwards (``KeyboardInterrupt`` or ``SystemExit``),
    unless an exception is on its way out already.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {sig: signal.signal(sig, lambda signum, _frame: pending.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if pending:
        if pending[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Terminated(128 + pending[0])


@contextlib.contextmanager
def local_superlink(
    *,
    flwr_home: str | Path | None = None,
    env_extra: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    keep_workdir: bool = False,
) -> Iterator[LocalSuperLink]:
    """A started :class:`LocalSuperLink` in a fresh temp dir, torn down (and the dir removed) on exit."""
    # Under /tmp, short: Ray's unix socket paths must stay below ~107 characters.
    workdir = Path(tempfile.mkdtemp(prefix="fedvit-", dir="/tmp" if os.path.isdir("/tmp") else None))
    link = LocalSuperLink(workdir, flwr_home=flwr_home, env_extra=env_extra, cwd=cwd)
    try:
        link.start()
        yield link
    finally:
        try:
            link.stop()
        finally:
            if not keep_workdir:
                shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- preparing a run


def app_project(app_dir: str | Path) -> dict[str, Any]:
    """The app's ``pyproject.toml`` as a dict (:class:`ConfigError` if missing or broken)."""
    path = Path(app_dir) / "pyproject.toml"
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{Path(app_dir).resolve()} is not a Flower app (no pyproject.toml)") from None
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err


def _app_section(project: Mapping[str, Any]) -> Mapping[str, Any]:
    return project.get("tool", {}).get("flwr", {}).get("app", {})


def is_fedvit_app(project: Mapping[str, Any]) -> bool:
    """True when the app's ServerApp is fedvit's (then its run config is a fedvit config)."""
    serverapp = str(_app_section(project).get("components", {}).get("serverapp", ""))
    return serverapp.split(".")[0] == "fedvit"


@dataclass
class PreparedRun:
    """A run config ready to submit, and what the runner learned while checking it."""

    run_config: dict[str, Any]
    num_clients: int | None = None  # fedvit: clients.num_clients of the resolved config
    output_dir: Path | None = None  # fedvit: <output.dir>/<run-name>, or the resumed run dir
    cfg: Any = None  # fedvit: the resolved FedvitConfig


def prepare_run_config(
    app_dir: str | Path,
    run_config: Mapping[str, Any],
    *,
    cwd: str | Path | None = None,
    local_paths: bool = True,
    validate: bool | None = None,
) -> PreparedRun:
    """Check a run config against the app and, for fedvit apps, resolve and validate it.

    - keys must exist in the app's ``[tool.flwr.app.config]`` (as Flower demands);
    - ``local_paths``: relative path values become absolute against ``cwd``;
    - ``validate`` (``None``: when the app is fedvit's): the defaults of ``pyproject.toml`` fused
      with ``run_config`` go through :func:`fedvit.config.load_config`, exactly what the ServerApp
      will see. Then, for a local run, ``output-dir`` and ``data-dir`` are pinned to absolute
      paths and a ``run-name`` is chosen when none is set, so the run directory is known here.

    Every problem raises :class:`ConfigError`.
    """
    project = app_project(app_dir)
    defaults = dict(_app_section(project).get("config", {}))
    unknown = sorted(set(run_config) - set(defaults))
    if unknown:
        raise ConfigError(
            f"unknown run-config key(s) {unknown} for the app in {Path(app_dir).resolve()}; "
            f"known keys: {sorted(defaults)}"
        )
    rc = {k: v for k, v in run_config.items() if v is not None}
    for key, value in rc.items():
        toml_value(value, key)  # representable on Flower's command line?
    if local_paths:
        rc = absolutize_paths(rc, cwd)
    if validate is None:
        validate = is_fedvit_app(project)
    if not validate:
        return PreparedRun(rc)

    from fedvit.config import load_config
    from fedvit.preflight import check as preflight

    cfg = load_config({**defaults, **rc})
    if local_paths:  # data, partition, model checked before anything starts (remote: data is not here)
        preflight(cfg, cwd=cwd, release=True)
    prepared = PreparedRun(rc, num_clients=cfg.clients.num_clients, cfg=cfg)
    base = Path(cwd) if cwd is not None else Path.cwd()
    if cfg.server.resume:
        resume = Path(cfg.server.resume).expanduser()
        prepared.output_dir = resume if resume.is_absolute() or not local_paths else (base / resume).resolve()
        return prepared
    run_name = cfg.output.run_name or default_run_name(cfg.method.name, cfg.data.name)
    out_dir = Path(cfg.output.dir).expanduser()
    if local_paths:
        out_dir = out_dir if out_dir.is_absolute() else (base / out_dir).resolve()
        data_dir = Path(cfg.data.data_dir).expanduser()
        if "data-dir" in defaults and not data_dir.is_absolute():
            rc["data-dir"] = str((base / data_dir).resolve())
        if "output-dir" in defaults:
            rc["output-dir"] = str(out_dir)
    if "run-name" in defaults:
        rc["run-name"] = run_name
    prepared.output_dir = out_dir / run_name
    return prepared


def default_run_name(method: str, dataset: str) -> str:
    """``<method>-<dataset>-<YYYYmmdd-HHMMSS>`` (the ServerApp's own default)."""
    try:
        from fedvit.results import default_run_name as server_default

        return server_default(method, dataset)
    except ImportError:
        return f"{method}-{dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def federation_config(
    num_supernodes: int | None,
    cpus_per_client: float | None = 1,
    gpus_per_client: float | None = 0.0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``--federation-config`` dict; ``extra`` (the user's) wins. Unknown keys: ConfigError."""
    fed: dict[str, Any] = {}
    if num_supernodes is not None:
        fed["num-supernodes"] = int(num_supernodes)
    if cpus_per_client is not None:
        fed["client-resources-num-cpus"] = _num(cpus_per_client)
    if gpus_per_client:
        fed["client-resources-num-gpus"] = float(gpus_per_client)
    fed.update(extra or {})
    unknown = sorted(set(fed) - set(FEDERATION_CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown federation-config key(s) {unknown}; known: {list(FEDERATION_CONFIG_KEYS)}"
        )
    n = fed.get("num-supernodes")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ConfigError(f"federation-config 'num-supernodes' must be an integer >= 1, got {n!r}")
    return fed


#: Simulated SuperNodes per concurrently running client (see :func:`simulation_workers`).
WORKERS_PER_SLOT = 8
MIN_WORKERS = 32


def local_simulation_env(cpus_per_client: float = 1) -> dict[str, str]:
    """Environment of a local fedvit simulation, for what the user's environment does not set:
    Ray workers import the ClientApp as they start, while the ServerApp sets up
    (:mod:`fedvit.warmup`); and, with one CPU per client, one OpenMP/torch thread in every process
    (the ServerApp's cores belong to the workers; with more threads they spin against the workers'
    on a machine with no spare core). With more CPUs per client the variable is left to Ray,
    which gives each worker its ``num_cpus`` threads unless the environment already decides."""
    wanted = {RAY_HOOK_VAR: RUNTIME_ENV_HOOK}
    if cpus_per_client <= 1:
        wanted["OMP_NUM_THREADS"] = "1"
    return {k: v for k, v in wanted.items() if k not in os.environ}


def simulation_workers(num_clients: int, cpus_per_client: float = 1, cpus: int | None = None) -> int:
    """How many SuperNodes a simulation starts: ``min(num_clients, max(32, 8 × slots))`` with
    ``slots = cpus / cpus_per_client`` clients running at once.

    Simulated nodes are *virtual workers*: each serves whichever client a message names (see
    ``fedvit.client_app.is_virtual_worker``), so results do not depend on their number. Flower's
    own cost per message grows with the number of nodes (its simulation scans every node's queue
    every 0.1 s, taking one message per node per pass); a few workers per running client keep that
    scan small while never starving a core (each pass hands out up to one message per worker)."""
    slots = max(1.0, (cpus if cpus is not None else os.cpu_count() or 1) / max(cpus_per_client, 1e-9))
    return int(min(num_clients, max(MIN_WORKERS, math.ceil(WORKERS_PER_SLOT * slots))))


def auto_gpus_per_client(cfg: Any, num_supernodes: int | None, available: float | None = None) -> float:
    """GPU share per simulated client so that all clients fit on the GPUs (0: none).

    ``available``: the GPUs to share (a Ray cluster's total); default this machine's visible ones.
    """
    if cfg is None or not num_supernodes or cfg.clients.device == "cpu":
        return 0.0
    gpus = visible_gpus() if available is None else available
    if gpus == 0:
        return 0.0
    return math.floor(min(1.0, gpus / num_supernodes) * 10_000) / 10_000  # Ray: 4 decimals


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


# --------------------------------------------------------------------------- a Ray cluster

#: Runs in a child Python (``python -c``) that joins the cluster as a driver: one zero-CPU task
#: pinned to every alive node reports which of the given paths that node does not see. Functions
#: of ``__main__`` travel by value, so the nodes need Ray and Python only.
_RAY_PROBE = """
import json, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

req = json.loads(sys.argv[1])
ray.init(address=req["address"], include_dashboard=False, log_to_driver=False, logging_level="ERROR")


@ray.remote(num_cpus=0, max_retries=0)
def missing(paths):
    import os

    return [label for label, path in paths.items() if not os.path.exists(path)]


nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
refs = [
    missing.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        req["paths"]
    )
    for n in nodes
]
seen = ray.get(refs, timeout=req["timeout"])
out = [
    {"ip": n["NodeManagerAddress"], "node_id": n["NodeID"], "resources": n["Resources"], "missing": m}
    for n, m in zip(nodes, seen)
]
print("FEDVIT-RAY-PROBE " + json.dumps(out), flush=True)
ray.shutdown()
"""


@dataclass
class RayNode:
    """One alive node of a Ray cluster, as the probe saw it."""

    ip: str
    node_id: str
    cpus: float
    gpus: float
    missing: list[str]  # labels of the checked paths this node does not see

    def clients_at_once(self, cpus_per_client: float, gpus_per_client: float) -> int:
        """ClientApps this node can run at once: Flower's rule (``pool_size_from_resources``)."""
        n = int(self.cpus / cpus_per_client) if cpus_per_client > 0 else 0
        if gpus_per_client > 0:
            n = min(n, int(self.gpus / gpus_per_client)) if self.gpus else 0
        return n


@dataclass
class RayCluster:
    """A running Ray cluster that a simulation joins (see :func:`check_ray_cluster`)."""

    address: str
    nodes: list[RayNode]

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)


def parse_ray_address(address: str) -> str:
    """``HOST:PORT`` of a running cluster's head node (what ``ray start --head`` prints)."""
    text = address.strip()
    if text.startswith("ray://"):
        raise ConfigError(
            f"ray address {address!r}: Ray Client (ray://) is not supported; run fedvit on a node of "
            "the cluster and give the head's HOST:PORT (e.g. 10.0.0.1:6379, as `ray start --head` prints)"
        )
    host, sep, port = text.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536) or any(c.isspace() for c in text):
        raise ConfigError(
            f"ray address {address!r}: expected HOST:PORT of the cluster's head node "
            "(e.g. 10.0.0.1:6379, as `ray start --head` prints)"
        )
    return f"{host}:{int(port)}"


def client_state_root(cfg: Any, run_dir: Path | None) -> Path | None:
    """Where a simulated federation keeps its clients' private state (``None``: unknown).

    ``clients.state_dir`` when set, else the run directory's ``clients/``.
    """
    if cfg is None:
        return None
    if cfg.clients.state_dir:
        return Path(cfg.clients.state_dir).expanduser()
    return run_dir / "clients" if run_dir is not None else None


def cluster_paths(prepared: PreparedRun, cwd: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """What every node of a cluster must see: ``(shared, present)``.

    ``shared``: directories that must be *the same* on every node (the clients' private state: a
    simulated client may run on any node in any round), checked with a marker file written here.
    ``present``: local inputs that exist here and must exist on every node (the data file,
    ``model.pretrained``); copies will do. Labels name the config key.
    """
    cfg = prepared.cfg
    shared: dict[str, Path] = {}
    present: dict[str, Path] = {}
    if cfg is None:
        return shared, present
    root = client_state_root(cfg, prepared.output_dir)
    if root is not None:
        key = "clients.state_dir" if cfg.clients.state_dir else "output-dir (client state: <run dir>/clients)"
        shared[key] = root if root.is_absolute() else (cwd / root).resolve()
    data_dir = Path(cfg.data.data_dir).expanduser()
    data_dir = data_dir if data_dir.is_absolute() else (cwd / data_dir).resolve()
    if cfg.data.path:
        data = Path(cfg.data.path).expanduser()
        data = data if data.is_absolute() else data_dir / data
        if data.exists():
            present["data.path"] = data
    if cfg.model.pretrained:
        pretrained = Path(cfg.model.pretrained).expanduser()
        pretrained = pretrained if pretrained.is_absolute() else (cwd / pretrained).resolve()
        if pretrained.exists():
            present["model.pretrained"] = pretrained
    return shared, present


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its deepest existing ancestor (a run directory may not exist yet)."""
    for p in (path, *path.parents):
        if p.is_dir():
            return p
    return Path(path.anchor or "/")


def check_ray_cluster(
    address: str,
    prepared: PreparedRun,
    *,
    cwd: Path,
    env: Mapping[str, str],
    say: Callable[[str], None] = lambda _msg: None,
    timeout_s: float = 120.0,
) -> RayCluster:
    """Join the cluster at ``address`` briefly (a child Python) and check it can run this federation.

    Every alive node must see the directories of :func:`cluster_paths` (``shared``: a marker file
    written here must be visible there; ``present``: the path exists). A cluster that cannot be
    reached from here (this machine must be one of its nodes), or a node that misses a path, is
    a :class:`ConfigError` naming the node and the key. A marker that cannot be written here
    skips that check, with a warning through ``say``.
    """
    shared, present = cluster_paths(prepared, cwd)
    markers: list[Path] = []
    paths: dict[str, str] = {label: str(p) for label, p in present.items()}
    token = f".fedvit-ray-check-{uuid.uuid4().hex}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="fvray-", dir="/tmp" if os.path.isdir("/tmp") else None))
    try:
        for label, directory in shared.items():
            marker = _existing_ancestor(directory) / token
            try:
                marker.write_text("fedvit: is this directory shared by every Ray node?\n")
            except OSError as err:
                say(f"warning: cannot check that {directory} ({label}) is shared by every Ray node: {err}")
                continue
            markers.append(marker)
            paths[label] = str(marker)
        child_env = {**env, RAY_ADDRESS_VAR: address, "RAY_TMPDIR": str(ray_tmp)}
        request = json.dumps({"address": address, "paths": paths, "timeout": timeout_s})
        try:
            res = subprocess.run(
                [sys.executable, "-c", _RAY_PROBE, request],
                env=child_env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout_s + 30,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ConfigError(
                f"ray address {address}: no answer from the cluster within {timeout_s + 30:.0f}s"
            ) from None
    finally:
        for marker in markers:
            with contextlib.suppress(OSError):
                marker.unlink()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    line = next((x for x in res.stdout.splitlines() if x.startswith("FEDVIT-RAY-PROBE ")), None)
    if res.returncode != 0 or line is None:
        reason = _last_error_line(res.stderr + res.stdout)
        raise ConfigError(
            f"ray address {address}: cannot join the Ray cluster from here ({reason}); start it with "
            "`ray start --head` and run fedvit on one of its nodes"
        )
    nodes = [
        RayNode(
            ip=str(n["ip"]),
            node_id=str(n["node_id"]),
            cpus=float(n["resources"].get("CPU", 0)),
            gpus=float(n["resources"].get("GPU", 0)),
            missing=list(n["missing"]),
        )
        for n in json.loads(line.split(" ", 1)[1])
    ]
    cluster = RayCluster(address, nodes)
    for node in nodes:
        for label in node.missing:
            where = shared.get(label) or present.get(label)
            if label in shared:
                raise ConfigError(
                    f"Ray node {node.ip} does not see {where} ({label}) as this machine does: every "
                    "simulated client may run on any node in any round, so its private state must be on "
                    "a filesystem all nodes share (same path); put output-dir there or set "
                    "clients.state_dir to such a directory"
                )
            raise ConfigError(
                f"Ray node {node.ip} has no {where} ({label}): every node reads the data itself, at the "
                "same path; copy it there (or put it on a shared filesystem)"
            )
    return cluster


def _say_cluster(cluster: RayCluster, fed: Mapping[str, Any], say: Callable[[str], None]) -> None:
    """One line per node: how many ClientApps it runs at once; a cluster that fits none is an error."""
    cpus = float(fed.get("client-resources-num-cpus", 1))
    gpus = float(fed.get("client-resources-num-gpus", 0.0))
    per_node = [(n, n.clients_at_once(cpus, gpus)) for n in cluster.nodes]
    if not any(k for _n, k in per_node):
        raise ConfigError(
            f"no node of the Ray cluster at {cluster.address} can run a client with "
            f"client-resources-num-cpus={cpus:g} client-resources-num-gpus={gpus:g} "
            f"(nodes: {', '.join(f'{n.ip} {n.cpus:g} CPU {n.gpus:g} GPU' for n in cluster.nodes)})"
        )
    say(f"Ray cluster at {cluster.address}: {len(cluster.nodes)} node(s); ClientApps at once per node:")
    for node, k in per_node:
        say(f"  {node.ip} ({node.cpus:g} CPU, {node.gpus:g} GPU): {k}")


def _last_error_line(text: str) -> str:
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    errors = [x for x in lines if "Error" in x or "error" in x]
    return (errors or lines or ["no output"])[-1][:400]


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        raise _Terminated(128 + signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


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
#: ``{"argv": [...], "env": {...}}`` on stdin, then runs as ``flwr ARGV`` would in that environment.
#: An empty stdin (the runner went away) ends it.
_PRIMED_FLWR = """
import json, os, sys
from flwr.cli.app import app
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


def run_flwr(
    app_dir: str | Path,
    run_config: Mapping[str, Any],
    *,
    num_supernodes: int | None = None,
    cpus_per_client: float = 1,
    gpus_per_client: float | None = 0.0,
    federation_config_extra: Mapping[str, Any] | None = None,
    superlink: str | None = None,
    ray_address: str | None = None,
    flwr_home: str | Path | None = None,
    timeout_s: float | None = None,
    stream: bool = True,
    env_extra: Mapping[str, str] | None = None,
    validate: bool | None = None,
    cwd: str | Path | None = None,
    log_sink: TextIO | None = None,
    progress: Callable[[str], None] | None = None,
    status_timeout_s: float = 120.0,
) -> RunOutcome:
    """Run a Flower app to its end and report its final status.

    ``num_supernodes``: simulated SuperNodes; ``None`` = for a fedvit app :func:`simulation_workers`
    (virtual workers serving its ``clients.num_clients`` clients)
    (local runs; required for other apps), not sent for a remote ``superlink``.
    ``federation_config_extra``: more ``--federation-config`` keys (they win).
    ``superlink``: ``None`` starts a private SuperLink (see the module doc); a name submits to
    that connection of ``FLWR_HOME``. ``ray_address``: ``HOST:PORT`` of a running Ray cluster's
    head (``ray start --head``) for the simulation to join, so clients run on all its nodes
    (Flower's RayBackend calls ``ray.init()``, which reads :data:`RAY_ADDRESS_VAR`); default
    ``$RAY_ADDRESS``, else a private Ray instance on this machine. The cluster is checked first
    (:func:`check_ray_cluster`). ``flwr_home``: the ``FLWR_HOME`` to use (local runs: the
    private one the runner writes, kept afterwards; default a temp dir).
    ``gpus_per_client``: Ray's GPU share per simulated client (Ray hides the GPUs from clients
    that get none); ``None`` = auto: for a fedvit app whose ``clients.device`` is not ``cpu`` and
    a machine with GPUs, the visible GPUs are shared evenly by the clients, else 0.
    ``timeout_s``: the whole run (SuperLink start to final status); then the run is stopped and
    the outcome is ``timeout`` (exit code 124). ``stream``: echo the run's log to ``log_sink``
    (default stdout). ``env_extra``: added to the environment of every process (e.g.
    ``CUDA_VISIBLE_DEVICES``). ``validate``: see :func:`prepare_run_config`. ``cwd``: what
    relative paths are relative to (default: the current directory). ``progress``: called with
    one-line messages (SuperLink started, run submitted ...). ``status_timeout_s``: give up after
    this long without an answer to ``flwr ls``.

    Config problems raise :class:`ConfigError` before anything starts; a SuperLink that does not
    come up raises :class:`RunnerError`; Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM/SIGHUP
    ``SystemExit(128 + signal)``, after teardown. Everything else is in the :class:`RunOutcome`.
    """
    t0 = time.monotonic()
    app = Path(app_dir).expanduser().resolve()
    here = Path(cwd).expanduser().resolve() if cwd is not None else Path.cwd()
    local = superlink is None
    say = progress or (lambda _msg: None)

    if ray_address is None and local:
        ray_address = os.environ.get(RAY_ADDRESS_VAR) or None  # what ray.init() would take anyway
    if ray_address is not None:
        if not local:
            raise ConfigError(
                "a Ray address applies to simulations started here; with --superlink the SuperLink's "
                "machine decides where clients run"
            )
        ray_address = parse_ray_address(ray_address)
        refused = [k for k in CLUSTER_REFUSED_KEYS if k in (federation_config_extra or {})]
        if refused:
            raise ConfigError(
                f"federation-config {refused} cannot be used with a Ray cluster (Ray refuses them when it "
                "joins one): each node's resources are what `ray start --num-cpus/--num-gpus` declared"
            )
    prepared = prepare_run_config(app, run_config, cwd=here, local_paths=local, validate=validate)
    if local and num_supernodes is None and prepared.num_clients is not None:
        extra_n = (federation_config_extra or {}).get("num-supernodes")
        num_supernodes = extra_n or simulation_workers(prepared.num_clients, cpus_per_client)
    fed = federation_config(
        num_supernodes, cpus_per_client if local else None, gpus_per_client or 0.0, federation_config_extra
    )
    cluster = None
    if ray_address is not None:
        say(f"checking the Ray cluster at {ray_address} ...")
        env = flwr_env(flwr_home, env_extra)
        cluster = check_ray_cluster(ray_address, prepared, cwd=here, env=env, say=say)
        env_extra = {**(env_extra or {}), RAY_ADDRESS_VAR: ray_address}
    if gpus_per_client is None and local and "client-resources-num-gpus" not in fed:
        auto = auto_gpus_per_client(
            prepared.cfg, fed.get("num-supernodes"), None if cluster is None else cluster.gpus
        )
        if auto > 0:
            fed["client-resources-num-gpus"] = auto
            say(f"{auto:g} GPU per client (clients.device={prepared.cfg.clients.device})")
    if local:
        n = fed.get("num-supernodes")
        if n is None:
            raise ConfigError("federation-config 'num-supernodes' is required for apps other than fedvit")
        if prepared.num_clients is not None and n > prepared.num_clients:
            raise ConfigError(
                f"federation-config num-supernodes={n} but clients.num_clients={prepared.num_clients}: "
                "simulated SuperNodes are workers that serve the clients, at most one per client; "
                f"set the run-config key num-clients={n} (or leave num-supernodes out)"
            )
    if cluster is not None:
        _say_cluster(cluster, fed, say)
    if local and prepared.cfg is not None:
        env_extra = {**local_simulation_env(cpus_per_client), **(env_extra or {})}
    if prepared.output_dir is not None:
        say(f"results will go to {prepared.output_dir}")
    args = ["run", str(app)]
    rc_text = format_run_config(prepared.run_config)
    fed_text = format_kv(fed, "federation-config")

    outcome = RunOutcome(
        run_id=None,
        status=STATUS_NOT_SUBMITTED,
        details="",
        returncode=EXIT_FAILED,
        run_config=prepared.run_config,
        output_dir=prepared.output_dir,
    )
    sink = (log_sink if log_sink is not None else sys.stdout) if stream else None
    try:
        with _signals_raise(), contextlib.ExitStack() as stack:
            primed = PrimedFlwr(flwr_env(flwr_home, env_extra), here)  # `flwr run`, ready when needed
            stack.callback(primed.close)
            if local:
                say("starting a private SuperLink ...")
                link = stack.enter_context(
                    local_superlink(flwr_home=flwr_home, env_extra=env_extra, cwd=here)
                )
                env, connection = link.env(), link.connection
                outcome.superlink = f"{connection} ({link.address}, started here)"
                say(f"SuperLink up at {link.address} (state in {link.workdir})")
            else:
                link = None
                env = flwr_env(flwr_home, env_extra)
                connection = str(superlink)
                outcome.superlink = connection
            session = _Session(
                connection=connection,
                env=env,
                cwd=here,
                deadline=None if timeout_s is None else t0 + timeout_s,
                remote=not local,
                status_timeout_s=status_timeout_s,
                say=say,
                link=link,
                primed=primed,
            )
            args += [connection, "--format", "json"]
            if rc_text:
                args += ["--run-config", rc_text]
            if fed_text:
                args += ["--federation-config", fed_text]
            session.submit_and_wait(args, sink, outcome)
    finally:
        outcome.elapsed_s = time.monotonic() - t0
    return outcome


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
            time.sleep(1.0 if now - started < 30 else 5.0)
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
