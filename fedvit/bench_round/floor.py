"""Flower's floor (step 3 of :mod:`fedvit.bench_round`): a no-op ClientApp in the same Ray
simulation engine, N nodes, one ``evaluate`` message per node per round carrying the shared
split's float count, run in a fresh subprocess (``python -m fedvit.bench_round --floor ...``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from fedvit.config import ConfigError

FLOOR_MESSAGES = 400  # steady messages the floor aims to time (at least 2 rounds after a warm-up)


def floor_child(n: int, floats: int, rounds: int, cpus: int) -> dict[str, Any]:
    """The floor's child: ``rounds`` rounds of one ``evaluate`` message to each of ``n`` no-op nodes."""
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedvit.wire import to_record

    times: list[float] = []
    client = ClientApp()

    @client.evaluate()
    def _evaluate(msg: Message, _ctx: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"acc": 0.5, "num-examples": 1})}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def _main(grid: Grid, _ctx: Context) -> None:
        nodes: list[int] = []
        while len(nodes) < n:
            nodes = list(grid.get_node_ids())
            time.sleep(0.1)
        arrays = to_record({"w": np.zeros(max(1, floats), dtype=np.float32)})
        for r in range(rounds):
            t = time.perf_counter()
            msgs = [
                Message(
                    RecordDict({"arrays": arrays, "config": ConfigRecord({"r": r})}),
                    dst_node_id=node,
                    message_type="evaluate",
                )
                for node in nodes
            ]
            replies = list(grid.send_and_receive(msgs))
            times.append(time.perf_counter() - t)
            if len(replies) != n or any(m.has_error() for m in replies):
                raise RuntimeError(f"floor round {r}: {len(replies)} replies of {n}, or errors")

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=n,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "logging_level": "ERROR"},
        },
    )
    if len(times) != rounds:
        raise RuntimeError(f"floor: {len(times)} of {rounds} rounds ran")
    steady = times[1:]  # round 0 warms Ray's actors up
    return {
        "floor_ms_per_message": 1000.0 * sum(steady) / (len(steady) * n),
        "nodes": n,
        "payload_floats": floats,
        "rounds": rounds,
        "round_s": [round(t, 4) for t in times],
        "ray_num_cpus": cpus,
    }


def floor_rounds(n: int) -> int:
    """Rounds of the floor run: one warm-up, then enough for ``FLOOR_MESSAGES`` messages (2..50)."""
    return 1 + min(50, max(2, math.ceil(FLOOR_MESSAGES / n)))


def flower_floor(
    n: int, floats: int, cpus: int, rounds: int | None = None, timeout_s: float = 600.0
) -> dict[str, Any]:
    """Flower's own per-message cost at ``n`` nodes, measured in a fresh subprocess."""
    import uuid

    from fedvit.runner import FLWR_ENV, TAG_VAR, descendants, kill_processes, tagged_processes

    if n < 1:
        raise ConfigError(f"bench round: the floor needs N >= 1 nodes, got {n}")
    rounds = rounds or floor_rounds(n)
    with tempfile.TemporaryDirectory(prefix="fvfl-", dir="/tmp") as ray_tmp:  # short: Ray's sockets
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(FLWR_ENV)
        env["RAY_TMPDIR"] = ray_tmp  # its own Ray cluster, never one somebody started
        env[TAG_VAR] = tag = f"bench-floor-{uuid.uuid4().hex}"  # finds what outlives the child
        cmd = [
            sys.executable,
            "-m",
            "fedvit.bench_round",
            "--floor",
            str(n),
            str(floats),
            str(rounds),
            str(cpus),
        ]
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except BaseException:
            kill_processes(descendants(proc.pid))
            proc.communicate()
            raise
        finally:
            kill_processes(tagged_processes(tag))
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        from fedvit.runner import RunnerError

        raise RunnerError(
            f"bench round: the floor run failed (exit {proc.returncode}): {err.strip()[-1500:]}"
        )
    return json.loads(lines[-1])
