"""Joining a running Ray cluster: its address checked, its nodes probed (shared client state,
data present on every node), and what each node can run reported."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedvit.errors import ConfigError
from fedvit.launch.prepare import PreparedRun

#: What Ray's ``ray.init()`` reads when called without an address, as Flower's RayBackend calls
#: it: ``HOST:PORT`` of a running cluster's head. Set for the simulation by ``ray_address``.
RAY_ADDRESS_VAR = "RAY_ADDRESS"
#: ``--federation-config`` keys Ray refuses when it joins a running cluster (each node declared
#: its resources with ``ray start --num-cpus/--num-gpus``).
CLUSTER_REFUSED_KEYS = ("init-args-num-cpus", "init-args-num-gpus")

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
