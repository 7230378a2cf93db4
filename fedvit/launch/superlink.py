"""A private ``flower-superlink --simulation`` for one run: free port, own ``FLWR_HOME``, own
database and Ray temp dir, optionally its own Ray head started beside it
(:mod:`fedvit.launch.ray_head`), torn down with everything it started (:class:`LocalSuperLink`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedvit.launch.errors import RunnerError
from fedvit.launch.procs import (
    LAUNCHER_VAR,
    TAG_VAR,
    WORKDIR_VAR,
    Proc,
    descendants,
    find_free_port,
    kill_until_gone,
    launcher_id,
    owns_listening_port,
    tagged_processes,
)
from fedvit.launch.ray_cluster import RAY_ADDRESS_VAR
from fedvit.launch.ray_head import PrivateRayHead, RayHeadSpec
from fedvit.launch.signals import deferred_signals

if TYPE_CHECKING:
    from fedvit.launch.watchdog import Watchdog

#: Set for every ``flwr`` / ``flower-*`` process the runner starts (the three are read by Flower).
FLWR_ENV: dict[str, str] = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else `uv sync` over the network
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
#: Name of the SuperLink connection the runner writes into its private ``config.toml``.
LOCAL_CONNECTION = "fedvit-local"


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
    """The environment for ``flwr`` commands: the Flower switches, PATH with our bin dir first.

    A launcher id or work dir inherited from an enclosing run is left out (``extra`` sets this
    run's): a process names its own launcher, never its launcher's launcher."""
    env = {k: v for k, v in os.environ.items() if k not in (LAUNCHER_VAR, WORKDIR_VAR)}
    env.update(FLWR_ENV)
    env["PATH"] = os.pathsep.join([str(bin_dir()), env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


# --------------------------------------------------------------------------- the SuperLink


class LocalSuperLink:
    """A private ``flower-superlink --simulation`` on a free loopback port.

    ``workdir`` holds ``flwr-home/config.toml`` (one connection, :data:`LOCAL_CONNECTION`),
    ``state.db``, ``superlink.log`` and the Ray temp dir. ``ray_head``: also start a private Ray
    head of that size, at the same time as the SuperLink, and point the simulation at it
    (``RAY_ADDRESS`` in the SuperLink's environment); :meth:`start` returns when the SuperLink is
    up and the head still starting or up (``ray.init`` in ``flwr-simulation`` waits for it; the
    runner checks it with :meth:`PrivateRayHead.wait_ready` once the run is submitted).
    Use as a context manager; :meth:`stop` tears down the SuperLink, the head and every process
    that inherited its tag.
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
        ray_head: RayHeadSpec | None = None,
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
        self.ray_head = (
            None
            if ray_head is None
            else PrivateRayHead(self.ray_tmp, self.workdir / "ray-head.log", ray_head)
        )

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
        """Start (the head, then) the SuperLink; on any failure everything started is torn down."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.ray_tmp.mkdir(parents=True, exist_ok=True)
        exe = flwr_executable("flower-superlink")
        tried: set[int] = set()
        if self.ray_head is not None:
            self.ray_head.spawn(flwr_executable("ray"), self._tagged_env(), self.cwd, exclude=tried)
            tried.add(self.ray_head.port or 0)
            self.env_extra[RAY_ADDRESS_VAR] = self.ray_head.address
        last_error = ""
        for _attempt in range(3):
            port = find_free_port(self.host, exclude=tried)
            tried.add(port)
            try:
                self._spawn(exe, port)
                self._wait_healthy()
            except _PortTaken as err:
                last_error = str(err)
                self._stop_process_tree(keep_head=True)  # the next port's SuperLink joins the same head
                continue
            self._write_connection()
            if self.ray_head is not None:
                self.ray_head.check_alive()  # its start goes on; the run's driver waits for it
            return
        raise RunnerError(f"flower-superlink did not start: {last_error}")

    def _tagged_env(self) -> dict[str, str]:
        """The environment of the processes this SuperLink owns (found and killed by its tag)."""
        env = self.env()
        env[TAG_VAR] = self.tag
        env[LAUNCHER_VAR] = self.env_extra.get(LAUNCHER_VAR) or launcher_id()  # see fedvit.launch.procs
        env["RAY_TMPDIR"] = str(self.ray_tmp)
        return env

    def _spawn(self, exe: str, port: int) -> None:
        self.port = port
        env = self._tagged_env()
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
        if self.ray_head is not None:
            for p in self.ray_head.processes():
                procs.setdefault(p.pid, p)
        procs.pop(os.getpid(), None)
        return list(procs.values())

    def _stop_process_tree(self, grace_s: float = 3.0, keep_head: bool = False) -> None:
        # The SuperLink's own group first (it was started in a new session: pgid == pid),
        # then every tagged process wherever it lives; repeat while new ones show up.
        # ``keep_head``: spare the private Ray head (its processes carry the tag too).
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(self.process.pid) != os.getpgid(0):
                    os.killpg(self.process.pid, signal.SIGTERM)
        head = self.ray_head
        if head is not None and not keep_head:
            # At once, no grace: Ray's processes hold nothing to save (the ServerApp writes its
            # results and checkpoints atomically) and would use up the whole SIGTERM grace.
            head.kill_now()

        def find() -> list[Proc]:
            if head is None or not keep_head:
                return self.processes()
            spared = {p.pid for p in head.processes()}
            return [p for p in self.processes() if p.pid not in spared]

        kill_until_gone(find, grace_s=grace_s)
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if self.process.poll() is None:
                    os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)

    def stop(self) -> None:
        """Tear down the SuperLink and all it started. Idempotent; Ctrl-C / SIGTERM wait for it."""
        try:
            with deferred_signals():
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


@contextlib.contextmanager
def local_superlink(
    *,
    flwr_home: str | Path | None = None,
    env_extra: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    keep_workdir: bool = False,
    watchdog: Watchdog | None = None,
    ray_head: RayHeadSpec | None = None,
) -> Iterator[LocalSuperLink]:
    """A started :class:`LocalSuperLink` in a fresh temp dir, torn down (and the dir removed) on exit.

    ``watchdog``: the launcher's (:mod:`fedvit.launch.watchdog`); it removes the dir too if the
    launcher dies. ``ray_head``: see :class:`LocalSuperLink`. Without ``keep_workdir`` the
    SuperLink's processes name the dir (:data:`~fedvit.launch.procs.WORKDIR_VAR`), so that a later
    run reaps it with them.
    """
    # Under /tmp, short: Ray's unix socket paths must stay below ~107 characters.
    workdir = Path(tempfile.mkdtemp(prefix="fedvit-", dir="/tmp" if os.path.isdir("/tmp") else None))
    if not keep_workdir:
        env_extra = {**(env_extra or {}), WORKDIR_VAR: str(workdir)}
        if watchdog is not None:
            watchdog.remove_on_death(workdir)
    link = LocalSuperLink(workdir, flwr_home=flwr_home, env_extra=env_extra, cwd=cwd, ray_head=ray_head)
    try:
        link.start()
        yield link
    finally:
        try:
            link.stop()
        finally:
            if not keep_workdir:
                shutil.rmtree(workdir, ignore_errors=True)
