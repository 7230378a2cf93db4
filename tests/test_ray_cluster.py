"""``fedvit run --ray-address``: a simulation that joins a running Ray cluster, so clients run on
all its nodes (Flower's RayBackend calls ``ray.init()``, which reads ``RAY_ADDRESS``).

Fast tests: the address syntax, options Ray refuses with a cluster, what every node must see, and
the per-node client count (Flower's own rule). Slow, integration: a real two-node cluster on this
machine, the head in one network namespace and the worker in another, joined by a veth pair whose
10.x addresses exist only inside them. The tests run in file order on one cluster:

1. a run whose client state directory the worker node cannot see (a tmpfs mounted over it in the
   worker's mount namespace) is refused with exit 2 before anything starts;
2. a 4-client, 2-round federation (digits, vit-micro) from the head's namespace completes, and
   client work ran on both nodes: a test-only ClientApp around fedvit's appends one line per
   handled message to ``<markers>/<node ip>.log`` (nothing extra is sent to the server);
3. teardown leaves no process of the cluster and no namespace.

Teardown kills the cluster's processes (found by an environment tag they inherit, their directory,
and their process tree) and deletes the namespaces: ``ray stop`` would stop every Ray process on the
machine by name, other users' included.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from deployhelpers import netns_unavailable

from fedvit import runner
from fedvit.config import ConfigError, load_config
from fedvit.runner import (
    FLWR_ENV,
    TAG_VAR,
    PreparedRun,
    Proc,
    RayCluster,
    RayNode,
    all_procs,
    bin_dir,
    cluster_paths,
    descendants,
    federation_config,
    kill_processes,
    parse_ray_address,
    run_flwr,
    toml_value,
)

REPO = Path(__file__).resolve().parents[1]
RAY_PORT = 6379  # the head's GCS, inside the head's own network namespace
MARKERS_VAR = "FEDVIT_TEST_RAY_MARKERS"


# --------------------------------------------------------------------------- fast


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10.0.0.1:6379", "10.0.0.1:6379"), (" head.lan:06380 ", "head.lan:6380"), ("[::1]:6379", "[::1]:6379")],
)
def test_ray_address_is_the_heads_host_and_port(text: str, expected: str) -> None:
    assert parse_ray_address(text) == expected


@pytest.mark.parametrize(
    "text", ["auto", "10.0.0.1", "10.0.0.1:", ":6379", "h:0", "h:70000", "h :1", "ray://h:10001"]
)
def test_ray_address_that_names_no_head_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="ray address"):
        parse_ray_address(text)


def _digits(tmp_path: Path) -> dict[str, object]:
    return {
        "num-clients": 2,
        "model": "vit-micro",
        "output-dir": str(tmp_path / "out"),
        "overrides": f"data.cache_dir={tmp_path / 'cache'}",
    }


def test_cluster_options_ray_refuses_fail_before_anything_starts(tmp_path: Path) -> None:
    # Ray refuses num_cpus/num_gpus when it joins a running cluster; a remote SuperLink's machine
    # decides where its clients run; RAY_ADDRESS from the environment is checked like the option.
    with pytest.raises(ConfigError, match=r"init-args-num-cpus.*Ray cluster"):
        run_flwr(
            REPO,
            _digits(tmp_path),
            ray_address="10.0.0.1:6379",
            federation_config_extra={"init-args-num-cpus": 2},
            cwd=tmp_path,
        )
    with pytest.raises(ConfigError, match="--superlink"):
        run_flwr(REPO, _digits(tmp_path), ray_address="10.0.0.1:6379", superlink="remote", cwd=tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ADDRESS", "auto")
        with pytest.raises(ConfigError, match="'auto'"):
            run_flwr(REPO, _digits(tmp_path), cwd=tmp_path)
    assert not (tmp_path / "out").exists()


def test_every_node_must_share_the_client_state_and_hold_the_data(tmp_path: Path) -> None:
    data = tmp_path / "data" / "organamnist.npz"
    data.parent.mkdir()
    data.write_bytes(b"")
    cfg = load_config({"model": "vit-micro"})
    cfg.data.path, cfg.data.data_dir = "organamnist.npz", "data"  # relative to the caller's directory
    run_dir = tmp_path / "out" / "run"
    shared, present = cluster_paths(PreparedRun({}, 5, run_dir, cfg), tmp_path)
    assert list(shared.values()) == [run_dir / "clients"] and present == {"data.path": data}
    cfg.clients.state_dir, cfg.data.path = str(tmp_path / "states"), "absent.npz"
    shared, present = cluster_paths(PreparedRun({}, 5, run_dir, cfg), tmp_path)
    assert shared == {"clients.state_dir": tmp_path / "states"} and present == {}


def test_clients_per_node_follow_flowers_actor_pool_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.simulation.ray_transport import ray_actor

    nodes = [
        RayNode("a", "1", 4.0, 0.0, []),
        RayNode("b", "2", 2.0, 1.0, []),
        RayNode("c", "3", 3.0, 2.0, []),
    ]
    fake = [{"Resources": {"CPU": n.cpus, "GPU": n.gpus} if n.gpus else {"CPU": n.cpus}} for n in nodes]
    monkeypatch.setattr(ray_actor.ray, "nodes", lambda: fake)
    for cpus, gpus in [(1, 0.0), (2, 0.0), (3, 0.0), (1, 0.5), (1, 1.0), (2, 0.25)]:
        resources = {"num_cpus": cpus, "num_gpus": gpus}
        ours = sum(n.clients_at_once(cpus, gpus) for n in nodes)
        assert ours == ray_actor.pool_size_from_resources(resources), resources


def test_a_cluster_that_fits_no_client_is_refused() -> None:
    cluster = RayCluster("10.0.0.1:6379", [RayNode("10.0.0.1", "1", 2.0, 0.0, [])])
    said: list[str] = []
    runner._say_cluster(cluster, federation_config(4, 1, 0.0), said.append)
    assert said[-1].strip() == "10.0.0.1 (2 CPU, 0 GPU): 2"
    with pytest.raises(ConfigError, match="no node of the Ray cluster"):
        runner._say_cluster(cluster, federation_config(4, 1, 0.5), said.append)


# --------------------------------------------------------------------------- a real cluster

MARKER_CLIENTAPP = '''\
"""Test-only ClientApp: fedvit's, and a line per handled message in $FEDVIT_TEST_RAY_MARKERS/<node ip>.log"""

import os
from pathlib import Path

import ray
from flwr.clientapp import ClientApp

from fedvit.client_app import app as fedvit_app

app = ClientApp()


def _handled(kind, message, context):
    reply = fedvit_app(message, context)
    path = Path(os.environ["FEDVIT_TEST_RAY_MARKERS"]) / f"{ray.util.get_node_ip_address()}.log"
    with open(path, "a") as f:
        f.write(f"{kind} {context.node_config['partition-id']} {os.getpid()}\\n")
    return reply


@app.query()
def query(message, context):
    return _handled("query", message, context)


@app.train()
def train(message, context):
    return _handled("train", message, context)


@app.evaluate()
def evaluate(message, context):
    return _handled("evaluate", message, context)
'''


def write_marker_app(directory: Path) -> Path:
    """fedvit's ServerApp and run-config keys, with :data:`MARKER_CLIENTAPP` as the ClientApp."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    lines = [
        "[project]",
        'name = "fedvit-raymarker"',
        'version = "0.1.0"',
        'license = "Apache-2.0"',
        'dependencies = ["flwr[simulation]"]',
        "",
        "[tool.flwr.app]",
        'publisher = "fedvit-tests"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedvit.server_app:app"',
        'clientapp = "raymarker:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {toml_value(value, key)}" for key, value in config.items()),
    ]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text("\n".join(lines) + "\n")
    (directory / "raymarker.py").write_text(MARKER_CLIENTAPP)
    return directory


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


class TwoNodeCluster:
    """A Ray head (namespace ``ns_head``) and a worker (``ns_worker``) joined by a veth pair."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(8)
        suffix = secrets.token_hex(2)
        self.ns_head, self.ns_worker = f"fvrh{suffix}", f"fvrw{suffix}"
        prefix = f"10.{150 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
        self.head_ip, self.worker_ip = f"{prefix}.1", f"{prefix}.2"
        # Short and under /tmp: Ray's unix sockets live below each node's temp dir.
        self.base = Path(tempfile.mkdtemp(prefix="fvrc-", dir="/tmp"))
        self.markers = self.base / "markers"
        self.hidden = self.base / "hidden"  # the worker node sees an empty tmpfs here
        for d in (self.markers, self.hidden):
            d.mkdir()
        self.env = {
            **os.environ,
            **FLWR_ENV,
            TAG_VAR: self.tag,  # every Ray process of this cluster inherits it
            MARKERS_VAR: str(self.markers),
            "FEDVIT_STATE_DIR": str(self.base / "state-fallback"),  # never ~/.cache
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.closed = False

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{RAY_PORT}"

    def start(self) -> TwoNodeCluster:
        _ip("netns", "add", self.ns_head)
        _ip("netns", "add", self.ns_worker)
        veth_h, veth_w = f"fvh{self.tag[:6]}", f"fvw{self.tag[:6]}"
        _ip("link", "add", veth_h, "type", "veth", "peer", "name", veth_w)
        for ns, dev, addr in ((self.ns_head, veth_h, self.head_ip), (self.ns_worker, veth_w, self.worker_ip)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "dev", dev)  # how Ray finds its node's address
        ray = str(bin_dir() / "ray")
        common = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]
        head = [
            "--head",
            f"--node-ip-address={self.head_ip}",
            f"--port={RAY_PORT}",
            "--include-dashboard=false",
        ]
        worker = [f"--address={self.address}", f"--node-ip-address={self.worker_ip}"]
        # Both at once: the worker waits for the head's GCS (saves ~10 s of a loaded machine).
        # The worker's processes live in the mount namespace `ip netns exec` made for them; a tmpfs
        # mounted there hides `hidden` from that node alone.
        hide = ["sh", "-c", 'mount -t tmpfs fvrc-hidden "$0" && exec "$@"', str(self.hidden)]
        starts = [
            self._ray_start(self.ns_head, [ray, "start", *head, *common, f"--temp-dir={self.base / 'h'}"]),
            self._ray_start(
                self.ns_worker, [*hide, ray, "start", *worker, *common, f"--temp-dir={self.base / 'w'}"]
            ),
        ]
        for ns, proc in zip((self.ns_head, self.ns_worker), starts, strict=True):
            out, _ = proc.communicate(timeout=150)
            assert proc.returncode == 0, f"ray start in {ns} failed:\n{out[-4000:]}"
        return self

    def _ray_start(self, ns: str, cmd: list[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd],
            env=self.env,
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def fedvit_run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """``fedvit run ARGS`` in the head's namespace (as a user on the head machine would)."""
        env = {k: v for k, v in self.env.items() if k not in (TAG_VAR, MARKERS_VAR)}
        return subprocess.run(
            ["ip", "netns", "exec", self.ns_head, str(bin_dir() / "fedvit"), "run", *args],
            env=env,
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def processes(self) -> list[Proc]:
        """Every live process of this cluster: those whose environment or command line holds its tag
        or its directory, and all their descendants. (Ray renames its agents and workers with
        setproctitle, which can overwrite the environment ``/proc`` shows: the tag alone misses some.)
        """
        procs = all_procs()
        needles = (self.tag.encode(), str(self.base).encode())
        found: dict[int, Proc] = {}
        for p in procs:
            if p.pid != os.getpid() and p.state not in "ZX" and _mentions(p.pid, needles):
                found.update((d.pid, d) for d in descendants(p.pid, procs))
        found.pop(os.getpid(), None)
        return list(found.values())

    def close(self) -> list[str]:
        """Kill every process of the cluster, delete the namespaces; what is left (should be nothing)."""
        if not self.closed:
            self.closed = True
            for _ in range(5):
                procs = self.processes()
                if not procs:
                    break
                kill_processes(procs, grace_s=5.0)
            for ns in (self.ns_head, self.ns_worker):  # the veth pair goes with them
                _ip("netns", "del", ns, check=False)
            shutil.rmtree(self.base, ignore_errors=True)
        left = [f"process {p.pid}" for p in self.processes()]
        names = _ip("netns", "list", check=False).stdout
        left += [f"namespace {ns}" for ns in (self.ns_head, self.ns_worker) if ns in names]
        return left


def _mentions(pid: int, needles: tuple[bytes, ...]) -> bool:
    """Whether a process's environment or command line contains one of ``needles``."""
    for part in ("environ", "cmdline"):
        with contextlib.suppress(OSError):
            raw = Path(f"/proc/{pid}/{part}").read_bytes()
            if any(n in raw for n in needles):
                return True
    return False


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if why := netns_unavailable():
        return f"ip netns is not permitted here ({why})"
    if not (bin_dir() / "ray").is_file():
        return "the 'ray' command is not installed beside this Python"
    return None


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[TwoNodeCluster]:
    if why := _skip_reason():
        pytest.skip(why)
    c = TwoNodeCluster()
    old = signal.signal(signal.SIGTERM, _interrupt)  # a CI timeout still tears the cluster down
    try:
        c.start()
        yield c
    finally:
        c.close()
        signal.signal(signal.SIGTERM, old)


def _output(res: subprocess.CompletedProcess[str]) -> str:
    return f"exit {res.returncode}\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-4000:]}"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(240)  # includes starting the cluster
def test_client_state_a_node_cannot_see_is_refused_before_anything_starts(cluster: TwoNodeCluster) -> None:
    res = cluster.fedvit_run(
        [
            str(write_marker_app(cluster.base / "app")),
            "--ray-address",
            cluster.address,
            "-c",
            f"num-clients=4 model=vit-micro run-name=hidden output-dir={cluster.hidden / 'out'}",
            "-c",
            f"overrides='data.cache_dir={cluster.base / 'cache'}'",
        ],
        timeout=150,
    )
    assert res.returncode == 2, _output(res)
    error = res.stderr.strip().splitlines()[-1]
    assert error.startswith("fedvit: error: Ray node ") and cluster.worker_ip in error, _output(res)
    assert str(cluster.hidden / "out" / "hidden" / "clients") in error, _output(res)
    assert "SuperLink" not in res.stderr, _output(res)  # refused before one was started
    assert list(cluster.hidden.iterdir()) == []  # the check's marker file is gone


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_on_the_cluster_completes_with_clients_on_both_nodes(cluster: TwoNodeCluster) -> None:
    out = cluster.base / "out"
    t0 = time.monotonic()
    res = cluster.fedvit_run(
        [
            str(write_marker_app(cluster.base / "app")),
            "--ray-address",
            cluster.address,
            "--timeout",
            "240",
            "-c",
            "method=fedper num-server-rounds=2 num-clients=4 model=vit-micro run-name=spread",
            "-c",
            f"output-dir={out}",
            "-c",
            f"overrides='train.local_epochs=1 output.plots=false data.cache_dir={cluster.base / 'cache'}'",
        ],
        timeout=280,
    )
    print(f"fedvit run on the two-node cluster: {time.monotonic() - t0:.1f}s")
    assert res.returncode == 0, _output(res)
    assert "finished:completed" in res.stdout, _output(res)
    # the runner reported both nodes, one ClientApp at a time each (1 CPU per node and per client)
    for ip in (cluster.head_ip, cluster.worker_ip):
        assert f"  {ip} (1 CPU, 0 GPU): 1" in res.stderr, _output(res)
    results = json.loads((out / "spread" / "results.json").read_text())
    assert results["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == [1, 2]

    handled = {
        path.stem: [line.split() for line in path.read_text().splitlines()]
        for path in cluster.markers.glob("*.log")
    }
    assert set(handled) == {cluster.head_ip, cluster.worker_ip}, handled.keys()
    trained = Counter(cid for lines in handled.values() for kind, cid, _pid in lines if kind == "train")
    assert trained == {str(c): 2 for c in range(4)}  # every client trained in both rounds ...
    for ip, lines in handled.items():  # ... and each node did part of that work
        assert any(kind == "train" for kind, _cid, _pid in lines), (ip, lines)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cluster_teardown_leaves_no_process_and_no_namespace(cluster: TwoNodeCluster) -> None:
    assert cluster.close() == []
    assert not cluster.base.exists()
