"""A private Ray head for one local simulation, started at the same time as its SuperLink.

Flower's ``flwr-simulation`` starts its ServerApp thread first and its Ray backend after it
(``ray.init()`` starting GCS and raylet, then the client actors), so on a small machine the
workers' start and imports come after the ServerApp's set-up instead of beside it. With a head
already running, ``ray.init()`` only connects (it reads :data:`RAY_ADDRESS_VAR`, which the runner
puts in the SuperLink's environment, and so in ``flwr-simulation``'s) and the actors start at once.
Measured on this 2-core machine under load: ``ray.init`` 4–9 s starting a cluster, 0.1–0.6 s
joining one (``docs/experiments.md``, issue 14).

The head is ``ray start --head --block`` in its own session, with the SuperLink's environment
(its tags, so teardown and the watchdog find it and every worker it starts) and its Ray temp dir.
Ports: the GCS's and the Ray client server's are free ports picked here (two runs at once must
not both take Ray's defaults); the rest are Ray's random picks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedvit.launch.errors import RunnerError
from fedvit.launch.procs import Proc, descendants, find_free_port, kill_processes
from fedvit.launch.ray_cluster import CLUSTER_REFUSED_KEYS

#: The line ``ray start`` prints once GCS, raylet and agents are up.
READY_LINE = "Ray runtime started"


@dataclass(frozen=True)
class RayHeadSpec:
    """What the private head declares: ``None`` = Ray's own detection (as ``ray.init()`` does)."""

    num_cpus: int | None = None
    num_gpus: int | None = None

    @classmethod
    def take_from(cls, fed: dict[str, Any]) -> RayHeadSpec:
        """The head's sizes, removed from the federation config ``fed`` (they would make Flower's
        ``ray.init`` fail against a running head)."""
        cpus_key, gpus_key = CLUSTER_REFUSED_KEYS  # Ray refuses them from a driver that joins a head
        return cls(fed.pop(cpus_key, None), fed.pop(gpus_key, None))


class PrivateRayHead:
    """``ray start --head --block`` on free ports; :meth:`spawn` returns at once, :meth:`wait_ready`
    waits for it. Stopped by killing :meth:`processes` (the caller's teardown does)."""

    def __init__(self, temp_dir: Path, log_path: Path, spec: RayHeadSpec | None = None) -> None:
        self.temp_dir = temp_dir
        self.log_path = log_path
        self.spec = spec or RayHeadSpec()
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``HOST:PORT`` of the head's GCS, for ``RAY_ADDRESS``."""
        if self.port is None:
            raise RunnerError("Ray head not started")
        return f"127.0.0.1:{self.port}"

    def command(self, ray_exe: str, port: int, client_port: int) -> list[str]:
        cmd = [
            ray_exe,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--ray-client-server-port={client_port}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
        ]
        if self.spec.num_cpus is not None:
            cmd.append(f"--num-cpus={self.spec.num_cpus}")
        if self.spec.num_gpus is not None:
            cmd.append(f"--num-gpus={self.spec.num_gpus}")
        return cmd

    def spawn(self, ray_exe: str, env: Mapping[str, str], cwd: Path, exclude: set[int]) -> None:
        """Start the head (does not wait); ``exclude``: ports taken by the caller."""
        self.port = find_free_port(exclude=exclude)
        client_port = find_free_port(exclude={*exclude, self.port})
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(ray_exe, self.port, client_port),
                cwd=cwd,
                env={**env, "RAY_USAGE_STATS_ENABLED": "0"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C is the launcher's to handle
            )

    def check_alive(self) -> None:
        """:class:`RunnerError` with the log's tail if ``ray start`` already exited."""
        assert self.process is not None
        code = self.process.poll()
        if code is not None:
            raise RunnerError(f"the private Ray head exited with code {code} while starting:\n{self.tail()}")

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until ``ray start`` says the runtime started; :class:`RunnerError` with its log's tail
        if it exits first or takes longer than ``timeout_s``."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if READY_LINE in self._log():
                return
            self.check_alive()
            time.sleep(0.1)
        raise RunnerError(f"the private Ray head did not start within {timeout_s:.0f}s:\n{self.tail()}")

    def processes(self) -> list[Proc]:
        """The head's ``ray start`` and everything below it (GCS, raylet, agents, workers)."""
        if self.process is None:
            return []
        return descendants(self.process.pid)

    def kill_now(self) -> None:
        """SIGKILL the head and everything below it (Ray removes its shared-memory files as it
        creates them: nothing is left in ``/dev/shm``)."""
        tree = self.processes()  # before the kill: orphans are no longer anyone's descendants
        self.signal_group(signal.SIGKILL)
        kill_processes(tree, grace_s=0.0)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)  # reaped: no zombie left behind

    def signal_group(self, sig: int) -> None:
        """Signal the head's session (its own process group) while ``ray start`` lives."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 20) -> str:
        return "\n".join(self._log().splitlines()[-n:])
