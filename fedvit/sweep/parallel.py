"""Runs of a sweep at once (``fedvit sweep --jobs N``): each run in its own child process.

Children are *spawned* (a fresh interpreter, not a fork: no torch, Flower or OpenMP state of the
parent is shared) and run one federation with one thread (``OMP_NUM_THREADS=1``,
``torch.set_num_threads(1)``), their stdout and stderr appended to the run's own log
(:data:`RUN_LOG` in its run directory), and send back ``(ok, message)``. They ignore Ctrl-C (a
terminal's Ctrl-C reaches the whole process group; the parent decides) and die with their parent
(``PR_SET_PDEATHSIG``: even a parent killed by SIGKILL leaves no child running). The parent
alone writes the sweep's manifest; :func:`stop` ends its children when it is interrupted.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from fedvit.config import ConfigError
from fedvit.sweep.engines import RunFn

#: A child's log, in its run directory (appended to: a resumed run's log follows the first part's).
RUN_LOG = "run.log"
_PR_SET_PDEATHSIG = 1


_NO_RESULT = object()


@dataclass(eq=False)
class Child:
    """One run in its own process."""

    name: str
    process: BaseProcess
    conn: Connection  # the parent's end: the child sends (ok, message) once
    log: Path
    t0: float
    result: Any = None  # what it sent (_NO_RESULT: its end closed without a result)

    def receive(self) -> None:
        """Take the child's result off the pipe (call when the pipe is readable)."""
        if self.result is None:
            try:
                self.result = self.conn.recv()
            except Exception:  # EOF (it died first), or what it sent cannot be read
                self.result = _NO_RESULT

    def outcome(self, exit_grace_s: float = 30.0) -> tuple[bool, str]:
        """``(ok, message)`` of a child that has sent its result or ended; joins it (a child that
        does not exit ``exit_grace_s`` after its result is stopped)."""
        if self.result is None and self.conn.poll():
            self.receive()
        self.process.join(exit_grace_s)
        if self.process.is_alive():
            stop([self])
        self.conn.close()
        result = self.result
        if isinstance(result, tuple) and len(result) == 2:
            return bool(result[0]), str(result[1])
        code = self.process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return False, f"its process {how} without a result (see {self.log})"


def check_picklable(run_fn: RunFn) -> None:
    """A run function a child can receive (a module-level function), else :class:`ConfigError`."""
    try:
        pickle.dumps(run_fn)
    except Exception as err:
        raise ConfigError(
            f"sweep: with jobs > 1 every run goes to a child process, so the run function must be "
            f"a module-level function ({type(err).__name__}: {err})"
        ) from err


def start(name: str, run_fn: RunFn, run_config: dict[str, Any], log: Path) -> Child:
    """Spawn the child that runs ``run_fn(run_config, load_config(run_config))``."""
    ctx = get_context("spawn")
    parent_end, child_end = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=child_main,
        args=(run_fn, run_config, str(log), child_end, os.getpid()),
        name=f"fedvit-sweep {name}",
        daemon=False,
    )
    t0 = time.monotonic()
    process.start()
    child_end.close()
    return Child(name, process, parent_end, log, t0)


def ended(children: list[Child], timeout: float | None = None) -> list[Child]:
    """The children among ``children`` that have sent their result or ended (waits up to
    ``timeout`` for one). Results are read as they come, so a long one never blocks its child."""
    ready = set(wait([o for c in children for o in (c.conn, c.process.sentinel)], timeout))
    done = []
    for c in children:
        if c.conn in ready:
            c.receive()
        if c.conn in ready or c.process.sentinel in ready:
            done.append(c)
    return done


def stop(children: list[Child], grace_s: float = 10.0) -> None:
    """SIGTERM every child, wait up to ``grace_s``, SIGKILL what is left; join them all."""
    for c in children:
        if c.process.is_alive():
            c.process.terminate()
    deadline = time.monotonic() + grace_s
    for c in children:
        c.process.join(max(0.0, deadline - time.monotonic()))
        if c.process.is_alive():
            c.process.kill()
            c.process.join()
        c.conn.close()


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when its parent dies (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(128 + signal.SIGTERM)


def child_main(
    run_fn: RunFn, run_config: dict[str, Any], log: str, conn: Connection, parent_pid: int
) -> None:
    """A child's body: one thread, output to ``log``, one federation, ``(ok, message)`` back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    print(f"[fedvit sweep] {run_config.get('run-name')}: pid {os.getpid()}", flush=True)
    try:
        import torch

        torch.set_num_threads(1)
        from fedvit.config import load_config

        ok, msg = run_fn(run_config, load_config(run_config))
    except Exception as err:  # reported to the parent; the traceback goes to the log
        traceback.print_exc()
        ok, msg = False, f"{type(err).__name__}: {err}"
    print(f"[fedvit sweep] {'completed' if ok else 'failed: ' + msg}", flush=True)
    conn.send((ok, msg))
    conn.close()
