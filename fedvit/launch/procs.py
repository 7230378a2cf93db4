"""Processes of a run: found in ``/proc`` by the tags they inherit, killed, reaped.

Every process the runner starts carries two environment variables that all its descendants
inherit, whatever process group or session they move to (SuperExec starts its own session):

- :data:`TAG_VAR`: one private SuperLink's random tag (its SuperLink, SuperExec,
  ``flwr-simulation``, the Ray cluster and its workers); teardown kills by it;
- :data:`LAUNCHER_VAR`: :func:`launcher_id` of the launcher, the process that called the runner
  (also on its ``flwr`` CLI helpers). A process whose launcher no longer exists is a leftover:
  :func:`reap_orphans` kills it, and :mod:`fedvit.launch.watchdog` does so the moment its
  launcher dies.

Linux only (``/proc``); elsewhere nothing is found and teardown falls back to the SuperLink's
process group alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fedvit.launch.errors import RunnerError

#: Every process of a runner-started SuperLink inherits this variable (value: a random tag);
#: teardown finds them by it, whatever process group or session they moved to.
TAG_VAR = "FEDVIT_RUNNER_TAG"
#: :func:`launcher_id` of the process that launched the run, on every process it started.
LAUNCHER_VAR = "FEDVIT_RUNNER_LAUNCHER"
#: The private SuperLink's work dir (a temp dir the runner removes), on the SuperLink's processes.
WORKDIR_VAR = "FEDVIT_RUNNER_WORKDIR"
#: Ports that Flower, Ray or their CLIs use by default: never handed out as "free".
RESERVED_PORTS = frozenset({6379, 8000, 8265, 9091, 9092, 9093, 9094, 9095, 10001, 39091, 39093, 52365})


def find_free_port(host: str = "127.0.0.1", exclude: frozenset[int] | set[int] = frozenset()) -> int:
    """A TCP port nothing listens on now (the kernel's pick), never a Flower/Ray default."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in RESERVED_PORTS and port not in exclude:
            return port
    raise RunnerError("no free TCP port found")


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


def proc_name(pid: int) -> str:
    """A short name for people: the script or program a process runs (``flower-superlink``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return "?"
    # `python /path/flower-superlink ...`, `python -m fedvit...`: the script, not the interpreter
    if Path(words[0]).name.startswith("python"):
        rest = words[1:]
        while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):
            rest = rest[2:] if rest[0] in ("-X", "-W") else rest[1:]  # interpreter options (-u, -X a ...)
        if not rest:
            return Path(words[0]).name
        if rest[0] == "-m":
            return rest[1] if len(rest) > 1 else "python -m"
        return "python -c" if rest[0] == "-c" else Path(rest[0]).name
    return Path(words[0]).name


def tagged_processes(tag: str, var: str = TAG_VAR) -> list[Proc]:
    """Live processes whose environment has ``var=<tag>`` (never this one)."""
    me = os.getpid()
    return [
        p for p in all_procs() if p.pid != me and p.state not in "ZX" and proc_environ(p.pid).get(var) == tag
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


def kill_until_gone(find: Callable[[], list[Proc]], grace_s: float = 3.0, rounds: int = 5) -> list[Proc]:
    """Kill what ``find()`` returns, again while new ones show up (a Ray cluster still starting
    workers); at most ``rounds`` times. Returns every process it killed."""
    killed: dict[tuple[int, int], Proc] = {}
    for _round in range(rounds):
        procs = find()
        if not procs:
            break
        killed.update(((p.pid, p.start), p) for p in procs)
        kill_processes(procs, grace_s=grace_s)
        grace_s = 1.0
    return list(killed.values())


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


# --------------------------------------------------------------------------- launchers


def _pid_namespace() -> str:
    """This process's pid namespace (``pid:[4026531836]``); ``""`` when it cannot be read."""
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:")
    except OSError:
        return ""


def launcher_id(pid: int | None = None) -> str:
    """``<pid>:<start ticks>:<pid namespace>`` of a process (default this one): names it even after
    its pid is reused, and only in the pid namespace where that pid means it (a container's)."""
    pid = os.getpid() if pid is None else pid
    proc = read_proc(pid)
    return f"{pid}:{proc.start if proc is not None else 0}:{_pid_namespace()}"


def launcher_alive(launcher: str) -> bool:
    """Whether the process a :func:`launcher_id` names still runs (a zombie does not).

    A launcher of another pid namespace (a container's processes seen from the host) or an id
    that cannot be read counts as alive: never reap on what cannot be judged from here.
    """
    pid_text, _, rest = launcher.partition(":")
    start_text, _, namespace = rest.partition(":")
    try:
        pid, start = int(pid_text), int(start_text)
    except ValueError:
        return True
    if namespace != _pid_namespace():
        return True
    proc = read_proc(pid)
    return proc is not None and proc.state not in "ZX" and (start == 0 or proc.start == start)


def orphans(launchers: Iterable[str] | None = None) -> dict[Proc, dict[str, str]]:
    """Live processes whose launcher is dead, with their environments.

    ``launchers``: only those of these launcher ids (dead or not: the watchdog calls this when
    its launcher died); default every launcher that no longer exists. Also found: processes with
    the :data:`TAG_VAR` of one found, and the descendants of those found. Ray's processes rename
    themselves (``setproctitle``), which overwrites part of what ``/proc/<pid>/environ`` shows:
    such a process may have lost one variable or both. In the environments returned,
    :data:`LAUNCHER_VAR` is the launcher a process was found by.
    """
    wanted = set(launchers) if launchers is not None else None
    me = os.getpid()
    alive: dict[str, bool] = {}
    procs = [p for p in all_procs() if p.pid != me and p.state not in "ZX"]
    envs = {p: proc_environ(p.pid) for p in procs}
    out = {}
    for p, env in envs.items():
        launcher = env.get(LAUNCHER_VAR)
        if not launcher:
            continue
        if wanted is not None:
            if launcher in wanted:
                out[p] = env
            continue
        if launcher not in alive:
            alive[launcher] = launcher_alive(launcher)
        if not alive[launcher]:
            out[p] = env
    # The rest stand for the launcher they are found by (never for one their own environment names).
    tags = {env[TAG_VAR]: env[LAUNCHER_VAR] for env in out.values() if env.get(TAG_VAR)}
    for p, env in envs.items():
        if p not in out and env.get(TAG_VAR) in tags:
            out[p] = {**env, LAUNCHER_VAR: tags[env[TAG_VAR]]}
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    todo = list(out)
    while todo:
        parent = todo.pop()
        for child in children.get(parent.pid, []):
            if child not in out:
                out[child] = {**envs[child], LAUNCHER_VAR: out[parent][LAUNCHER_VAR]}
                todo.append(child)
    return out


def is_runner_workdir(path: str | Path) -> bool:
    """A private SuperLink's temp dir as :func:`fedvit.runner.local_superlink` makes them."""
    p = Path(path)
    return p.is_absolute() and p.name.startswith("fedvit-") and (p / "superlink.log").is_file()


@dataclass
class Reaped:
    """What :func:`reap_orphans` removed."""

    launchers: list[str]
    processes: list[str]  # names, as proc_name() gives them
    workdirs: list[str]

    def line(self, who: str = "dead fedvit launcher(s)") -> str:
        """One line for people: ``reaped 7 process(es) of dead fedvit launcher(s) (pid 12): ...``."""
        names = Counter(self.processes)
        listed = ", ".join(f"{n} x{k}" if k > 1 else n for n, k in sorted(names.items()))
        pids = ", ".join(x.split(":")[0] for x in self.launchers)
        text = f"reaped {len(self.processes)} process(es) of {who} (pid {pids}): {listed or '-'}"
        if self.workdirs:
            text += f"; removed {', '.join(self.workdirs)}"
        return text


def reap_orphans(launchers: Iterable[str] | None = None, extra_dirs: Iterable[str] = ()) -> Reaped | None:
    """Kill what dead launchers left running and remove their SuperLinks' work dirs.

    ``launchers``: see :func:`orphans`. ``extra_dirs``: more work dirs to remove (the watchdog's,
    announced by its launcher). ``None`` when there was nothing to do.
    """
    scope = None if launchers is None else set(launchers)
    seen: set[str] = set(scope or ())
    names: dict[tuple[int, int], str] = {}
    dirs = list(extra_dirs)

    def find() -> list[Proc]:
        nonlocal scope
        found = orphans(scope)
        for p, env in found.items():
            names.setdefault((p.pid, p.start), proc_name(p.pid))  # before it is killed
            seen.add(env[LAUNCHER_VAR])
            d = env.get(WORKDIR_VAR)
            if d and d not in dirs and is_runner_workdir(d):
                dirs.append(d)
        scope = set(seen)  # later rounds: children the same launchers' processes started meanwhile
        return list(found)

    kill_until_gone(find)
    removed = []
    for d in dirs:
        if os.path.isdir(d):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    if not names and not removed:
        return None
    return Reaped(launchers=sorted(seen), processes=list(names.values()), workdirs=removed)
