"""Real Flower deployments for tests: a ``flower-superlink`` and ``flower-supernode`` processes,
each SuperNode in its own network namespace on a private subnet (veth pairs to a bridge that
the SuperLink listens on), or all on loopback where namespaces are unavailable.

Every process gets an environment tag (:data:`fedvit.runner.TAG_VAR`); :meth:`Deployment.close`
kills everything that carries it (the SuperExec and ClientApp processes the SuperLink and
SuperNodes start included) and removes the namespaces and links it made.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedvit import deploy
from fedvit.runner import (
    TAG_VAR,
    find_free_port,
    flwr_env,
    flwr_executable,
    format_run_config,
    kill_processes,
    parse_ls_json,
    parse_submit_json,
    tagged_processes,
)

REPO = Path(__file__).resolve().parents[1]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def netns_unavailable() -> str | None:
    """Why private network namespaces cannot be made here (``None``: they can)."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no 'ip' command"
    name = f"fvprobe{secrets.token_hex(3)}"
    try:
        res = _ip("netns", "add", name, check=False)
        if res.returncode != 0:
            return f"ip netns add failed: {res.stderr.strip()}"
        res = _ip("link", "add", f"fvp{secrets.token_hex(3)}", "type", "bridge", check=False)
        if res.returncode != 0:
            return f"cannot create a bridge: {res.stderr.strip()}"
        _ip("link", "del", res.args[3], check=False)
        return None
    except (OSError, subprocess.SubprocessError) as err:
        return str(err)
    finally:
        _ip("netns", "del", name, check=False)


class Subnet:
    """A bridge in the root namespace (``.1``, the SuperLink's address) and, per node, a
    namespace joined to it by a veth pair (``.<10+i>``)."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.prefix = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
        self.bridge = f"fvb{self.tag}"
        self.host = f"{self.prefix}.1"
        self.namespaces: list[str] = []
        self.links: list[str] = [self.bridge]
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_namespace(self, index: int) -> tuple[str, str]:
        """(namespace name, its address) for node ``index``."""
        ns, outer, inner = f"fv{self.tag}n{index}", f"fvh{self.tag}{index}", f"fvn{self.tag}{index}"
        addr = f"{self.prefix}.{10 + index}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        self.links.append(outer)
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns, addr

    def close(self) -> None:
        for ns in self.namespaces:
            _ip("netns", "del", ns, check=False)
        for link in reversed(self.links):
            _ip("link", "del", link, check=False)


def superlink_args(host: str, port: int, certs: Path | None, auth: bool, workdir: Path) -> list[str]:
    """The SuperLink arguments a :class:`Deployment` uses (``tests/test_docker_files.py`` compares
    them with the compose files')."""
    return deploy.superlink_args(
        host=host,
        port=port,
        certs=str(certs) if certs else None,
        auth=auth,
        database=str(workdir / "state.db"),
    )


@dataclass
class Node:
    """One ``flower-supernode`` process."""

    index: int
    args: list[str]
    log_path: Path
    netns: str | None
    process: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class Deployment:
    """A SuperLink (optionally TLS + SuperNode auth) and SuperNodes, for one test module."""

    workdir: Path
    tls: bool = False
    auth: bool = False
    use_netns: bool = True
    tag: str = field(default_factory=lambda: secrets.token_hex(8))
    subnet: Subnet | None = None
    netns_note: str = ""
    port: int = deploy.SUPERLINK_PORT
    superlink: subprocess.Popen[bytes] | None = None
    nodes: dict[int, Node] = field(default_factory=dict)

    # ------------------------------------------------------------------ setup
    def start(self) -> Deployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        why = netns_unavailable() if self.use_netns else "FEDVIT_TEST_NETNS=0"
        if why is None:
            self.subnet = Subnet()
            self.host = self.subnet.host
            self.netns_note = f"SuperNodes in network namespaces on {self.subnet.prefix}.0/24"
        else:
            self.host = "127.0.0.1"
            self.port = find_free_port()
            self.netns_note = f"network namespaces unavailable ({why}): falling back to loopback"
        print(f"[deployment] {self.netns_note}", flush=True)
        self.certs = self.workdir / "certs"
        if self.tls:
            subprocess.run(
                [str(REPO / "scripts" / "make_certs.sh"), "-o", str(self.certs), "-n", "4", self.host],
                check=True,
                capture_output=True,
                timeout=60,
            )
        self.flwr_home = self.workdir / "flwr-home"
        self.flwr_home.mkdir(exist_ok=True)
        conn = deploy.connection_toml(
            "fed", self.address, str(self.certs / deploy.CA_CERT) if self.tls else None
        )
        (self.flwr_home / "config.toml").write_text(deploy.flwr_config_toml({"fed": conn}, "fed"))
        args = superlink_args(self.host, self.port, self.certs if self.tls else None, self.auth, self.workdir)
        exe = flwr_executable("flower-superlink")
        self.superlink = self._spawn([exe, *args], self.workdir / "superlink.log")
        self._wait_superlink()
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        env = flwr_env(self.flwr_home)
        env[TAG_VAR] = self.tag
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        return env

    def _spawn(self, cmd: list[str], log: Path, netns: str | None = None) -> subprocess.Popen[bytes]:
        if netns is not None:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        with open(log, "ab") as f:
            return subprocess.Popen(
                cmd,
                cwd=self.workdir,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_superlink(self, timeout: float = 60) -> None:
        assert self.superlink is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited:\n{self.superlink_log()[-3000:]}")
            res = self.flwr(["ls", "fed", "--format", "json"], timeout=30, check=False)
            if '"success": true' in res.stdout:
                return
            time.sleep(0.5)
        raise RuntimeError(f"SuperLink not up after {timeout}s:\n{self.superlink_log()[-3000:]}")

    def superlink_log(self) -> str:
        return (self.workdir / "superlink.log").read_text(errors="replace")

    # ------------------------------------------------------------------ nodes
    def key(self, index: int) -> Path:
        return self.certs / deploy.supernode_key(index)

    def register(self, index: int) -> None:
        res = self.flwr(["supernode", "register", str(self.key(index)) + ".pub", "fed", "--format", "json"])
        assert '"success": true' in res.stdout, res.stdout + res.stderr

    def add_node(
        self,
        index: int,
        client_id: int,
        *,
        state_dir: Path,
        insecure: bool = False,
        key: Path | None = None,
        max_wait_s: float | None = None,
    ) -> Node:
        """Start SuperNode ``index`` (its own namespace, if any) as client ``client_id``."""
        netns = None
        if self.subnet is not None:
            netns = f"fv{self.subnet.tag}n{index}"
            if netns not in self.subnet.namespaces:
                netns, _addr = self.subnet.add_namespace(index)
        port = deploy.SUPERNODE_PORT if netns else find_free_port()
        args = deploy.supernode_args(
            self.address,
            deploy.node_config(client_id, state_dir=str(state_dir), device="cpu"),
            port=port,
            certs=None if insecure or not self.tls else str(self.certs),
            key=str(key) if key is not None else None,
            max_wait_s=max_wait_s,
        )
        node = Node(index, args, self.workdir / f"supernode-{index}.log", netns)
        node.process = self._spawn([flwr_executable("flower-supernode"), *args], node.log_path, netns)
        self.nodes[index] = node
        return node

    def stop_node(self, index: int, sig: int = signal.SIGTERM) -> None:
        """Stop SuperNode ``index`` and its ClientApp processes."""
        node = self.nodes.pop(index)
        if node.process is not None and node.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, sig)
            try:
                node.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(node.process.pid, signal.SIGKILL)
                node.process.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)  # ClientApps left in its group

    def wait_nodes(self, count: int, timeout: float = 90) -> list[dict[str, Any]]:
        """Wait until ``count`` SuperNodes are online; their listing."""
        deadline = time.monotonic() + timeout
        online: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            res = self.flwr(["supernode", "ls", "fed", "--format", "json"], check=False)
            dead = [i for i, n in self.nodes.items() if n.process is None or n.process.poll() is not None]
            if dead:
                logs = "\n".join(f"--- node {i}\n{self.nodes[i].log()[-2000:]}" for i in dead)
                raise AssertionError(f"SuperNode(s) {dead} exited\n{logs}")
            with contextlib.suppress(ValueError):
                data = json.loads(res.stdout[res.stdout.find("{") :])
                online = [n for n in data.get("nodes", []) if str(n.get("status", "")).lower() == "online"]
                if len(online) >= count:
                    return online
            time.sleep(1)
        logs = "\n".join(f"--- node {i}\n{n.log()[-1500:]}" for i, n in self.nodes.items())
        raise AssertionError(f"only {len(online)} of {count} SuperNodes online after {timeout}s\n{logs}")

    # ------------------------------------------------------------------ runs
    def flwr(
        self, args: list[str], timeout: float = 60, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [flwr_executable("flwr"), *args],
            cwd=self.workdir,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def submit(self, run_config: dict[str, Any]) -> str:
        """``flwr run`` the fedvit app on this deployment; the run id."""
        res = self.flwr(
            ["run", str(REPO), "fed", "--format", "json", "--run-config", format_run_config(run_config)],
            timeout=120,
        )
        return parse_submit_json(res.stdout + res.stderr)

    def status(self, run_id: str) -> tuple[str, str]:
        res = self.flwr(["ls", "--run-id", run_id, "fed", "--format", "json"])
        return parse_ls_json(res.stdout, run_id)

    def wait_run(self, run_id: str, timeout: float) -> tuple[str, str]:
        """Poll ``flwr ls`` until the run's status is final; (status, details)."""
        deadline = time.monotonic() + timeout
        status = ("unknown", "")
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                status = self.status(run_id)
                if status[0].startswith("finished"):
                    return status
            time.sleep(1)
        self.flwr(["stop", run_id, "fed"], check=False)
        return ("timeout", f"last status {status}")

    def run_log(self, run_id: str) -> str:
        res = self.flwr(["log", run_id, "fed", "--show"], timeout=30, check=False)
        return res.stdout + res.stderr

    def serverapp_pids(self) -> list[int]:
        """Live ServerApp processes of this deployment."""
        out = []
        for p in tagged_processes(self.tag):
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")
                if any(part.endswith(b"flwr-serverapp") for part in cmd[:2]):
                    out.append(p.pid)
        return out

    def diagnostics(self) -> str:
        parts = [f"--- superlink\n{self.superlink_log()[-3000:]}"]
        parts += [f"--- node {i}\n{n.log()[-2000:]}" for i, n in self.nodes.items()]
        return "\n".join(parts)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Kill every process of this deployment and remove its namespaces and links."""
        for index in list(self.nodes):
            with contextlib.suppress(Exception):
                self.stop_node(index, signal.SIGKILL)
        if self.superlink is not None and self.superlink.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.superlink.pid, signal.SIGTERM)
        for _ in range(5):
            procs = tagged_processes(self.tag)
            if not procs:
                break
            kill_processes(procs, grace_s=2.0)
        if self.superlink is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.superlink.wait(timeout=5)
        if self.subnet is not None:
            self.subnet.close()
        left = tagged_processes(self.tag)
        assert not left, f"processes left behind: {[p.pid for p in left]}"
