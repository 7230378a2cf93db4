"""A run's watchdog: tears the run down when its launcher dies, by any signal (SIGKILL too).

The runner starts it first (``python -m fedvit.launch.watchdog``), in a session of its own, with
its stdin the read end of a pipe whose write end only the runner holds. The runner writes
``dir <path>`` lines for work dirs to remove, and ``done`` once it has torn the run down itself
(normal end, failure, timeout, Ctrl-C, SIGTERM): then the watchdog just exits. When the pipe
closes without ``done`` the launcher is gone (the kernel closes its descriptors however it
died), and the watchdog kills every process that carries the launcher's id
(:data:`~fedvit.launch.procs.LAUNCHER_VAR`: the SuperLink, SuperExec, the simulation, Ray and
its workers, the runner's ``flwr`` helpers), removes the work dirs, prints one line to stderr
and exits. Should the pipe stay open (a child forked without exec holding its write end), it
also checks once a second that the launcher still exists.

It ignores SIGINT and SIGHUP (the launcher's terminal is the launcher's to handle) and carries
neither tag itself, so a run's teardown never kills it and :func:`~fedvit.launch.procs.reap_orphans`
never mistakes it for a leftover.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

from fedvit.launch.procs import LAUNCHER_VAR, TAG_VAR, WORKDIR_VAR, launcher_alive, launcher_id, reap_orphans

#: Seconds between checks that the launcher still exists (beside the pipe's end of file).
POLL_S = 1.0


class Watchdog:
    """The launcher's side: start it, announce work dirs, release it at a normal end."""

    def __init__(self, proc: subprocess.Popen[bytes], write_fd: int, launcher: str) -> None:
        self.proc = proc
        self.launcher = launcher
        self._fd: int | None = write_fd

    @classmethod
    def start(cls, launcher: str | None = None) -> Watchdog:
        """A watchdog for this process (``launcher``: its :func:`launcher_id`, default this one)."""
        launcher = launcher or launcher_id()
        read_fd, write_fd = os.pipe()  # not inheritable: no other child gets the write end
        env = {k: v for k, v in os.environ.items() if k not in (TAG_VAR, LAUNCHER_VAR, WORKDIR_VAR)}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedvit.launch.watchdog", "--launcher", launcher],
                stdin=read_fd,
                stdout=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a Ctrl-C or SIGTERM to the launcher's group is not for it
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        return cls(proc, write_fd, launcher)

    def _send(self, line: str) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):  # it died: nothing to tell it
                os.write(self._fd, (line + "\n").encode())

    def remove_on_death(self, path: str | Path) -> None:
        """Remove ``path`` (a work dir) too if the launcher dies."""
        self._send(f"dir {path}")

    def release(self, timeout_s: float = 10.0) -> None:
        """The run is torn down: the watchdog exits without doing anything. Idempotent."""
        if self._fd is None:
            return
        self._send("done")
        os.close(self._fd)
        self._fd = None
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def watch(launcher: str, fd: int = 0, poll_s: float = POLL_S) -> tuple[bool, list[str]]:
    """Wait on the pipe: ``(released, dirs)``; ``released`` false when the launcher died."""
    dirs: list[str] = []
    buf = b""
    while True:
        ready, _, _ = select.select([fd], [], [], poll_s)
        if not ready:
            if not launcher_alive(launcher):
                return False, dirs
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return False, dirs
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            word, _, arg = line.decode(errors="replace").partition(" ")
            if word == "done":
                return True, dirs
            if word == "dir" and arg:
                dirs.append(arg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedvit.launch.watchdog", description=__doc__)
    parser.add_argument(
        "--launcher",
        required=True,
        help="launcher id (fedvit.launch.procs.launcher_id) of the process to watch",
    )
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    released, dirs = watch(args.launcher)
    if released:
        return 0
    reaped = reap_orphans([args.launcher], extra_dirs=dirs)
    if reaped is not None:
        with contextlib.suppress(OSError, ValueError):
            print(f"fedvit watchdog: {reaped.line('launcher')} (it died)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
