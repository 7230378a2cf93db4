"""A real deployment: ``flower-superlink`` with TLS and SuperNode authentication, 3
``flower-supernode`` processes, each in its own network namespace on a private subnet made here
(loopback where namespaces are unavailable: the fixture prints which), and ``flwr run`` of the
fedvit app against them. The commands come from :mod:`fedvit.deploy`, as in ``docker/`` and
``docs/deployment.md``.

One federation serves the whole module (starting Flower processes is the slow part); the tests
run in file order:

1. a SuperNode with an unregistered key is refused; 2. a plain-text SuperNode and a plain-text
``flwr`` cannot connect to the TLS SuperLink; 3. a 2-round run of 3 clients whose ServerApp is
killed after round 1's checkpoint; 4. SuperNode 0 restarts and its private state directory
survives; 5. the run resumes from the checkpoint (same server state), SuperNode 2 is killed
(SIGKILL) in the middle of round 2, the round finishes with the other two (``server.min_train_clients=2``)
and the run ends ``finished:completed`` (``flwr ls``) with a complete ``results.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from deployhelpers import Deployment

pytestmark = [pytest.mark.integration]

TINY = (
    "model.depth=1 model.embed_dim=16 model.num_heads=2 train.local_epochs=1 output.plots=false "
    "server.min_train_clients=2"
)
RUN_TIMEOUT = 420.0


def _missing() -> str | None:
    for exe in ("openssl", "ssh-keygen"):
        if shutil.which(exe) is None:
            return f"{exe} not found"
    from fedvit.runner import RunnerError, flwr_executable

    for exe in ("flower-superlink", "flower-supernode", "flwr"):
        try:
            flwr_executable(exe)
        except RunnerError as err:
            return str(err)
    return None


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory):
    """TLS + SuperNode auth SuperLink with 3 registered SuperNodes (clients 0, 1, 2)."""
    if why := _missing():
        pytest.skip(f"deployment prerequisites missing: {why}")
    work = tmp_path_factory.mktemp("deploy")
    # FEDVIT_TEST_NETNS=0: everything on loopback even where namespaces could be made
    d = Deployment(work, tls=True, auth=True, use_netns=os.environ.get("FEDVIT_TEST_NETNS", "1") != "0")
    # SIGTERM (a CI job's timeout) becomes KeyboardInterrupt, so the teardown below still runs
    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        d.start()
        for i in range(3):
            d.register(i)
            d.add_node(i, i, state_dir=work / f"device-{i}", key=d.key(i))
        d.wait_nodes(3)
        d.shared = {}  # type: ignore[attr-defined]  (what one test leaves to the next)
        yield d
    finally:
        d.close()
        signal.signal(signal.SIGTERM, old)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _node_refused(d: Deployment, index: int, **kwargs) -> str:
    node = d.add_node(index, index, state_dir=d.workdir / f"intruder-{index}", max_wait_s=8, **kwargs)
    assert node.process is not None
    try:
        code = node.process.wait(timeout=90)
    except Exception:
        d.stop_node(index, signal.SIGKILL)
        raise
    d.nodes.pop(index)
    assert code != 0, node.log()[-2000:]
    return node.log()


@pytest.mark.timeout(300)  # includes the module fixture's setup (certificates, SuperLink, 3 SuperNodes)
def test_supernode_with_unregistered_key_is_refused(fed: Deployment) -> None:
    log = _node_refused(fed, 3, key=fed.key(3))  # key pair 3 exists but was never registered
    assert "Failed to initialize the connection" in log or "rror" in log, log[-2000:]
    assert len(fed.wait_nodes(3)) == 3  # the three registered nodes only


@pytest.mark.timeout(150)
def test_plaintext_clients_cannot_connect_to_the_tls_superlink(fed: Deployment) -> None:
    _node_refused(fed, 4, insecure=True, key=fed.key(0))
    # the CLI without TLS: the same address, `insecure = true`
    home = fed.workdir / "plain-home"
    home.mkdir(exist_ok=True)
    from fedvit import deploy

    (home / "config.toml").write_text(
        deploy.flwr_config_toml({"plain": deploy.connection_toml("plain", fed.address)}, "plain")
    )
    env = fed.env()
    env["FLWR_HOME"] = str(home)
    import subprocess

    from fedvit.runner import flwr_executable

    res = subprocess.run(
        [flwr_executable("flwr"), "ls", "plain", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=fed.workdir,
    )
    assert '"success": true' not in res.stdout, res.stdout


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_for(cond, timeout: float, what: str, d: Deployment) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{d.diagnostics()}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serverapp_killed_after_a_checkpoint(fed: Deployment) -> None:
    out = fed.workdir / "out"
    rc = {
        "method": "fedper",
        "num-server-rounds": 2,
        "num-clients": 3,
        "output-dir": str(out),
        "run-name": "multinode",
        "overrides": f"{TINY} data.cache_dir={fed.workdir / 'cache'}",
    }
    run_id = fed.submit(rc)
    run_dir = out / "multinode"
    state = run_dir / "checkpoint" / "state.json"
    _wait_for(state.is_file, RUN_TIMEOUT, "round 1's checkpoint", fed)
    pids = fed.serverapp_pids()
    assert pids, "no ServerApp process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    status, details = fed.wait_run(run_id, 120)
    assert status.startswith("finished") and status != "finished:completed", (status, details)
    assert json.loads(state.read_text())["round"] == 1
    fed.shared.update(run_dir=run_dir, rc=rc)


@pytest.mark.timeout(150)
def test_private_state_survives_a_supernode_restart(fed: Deployment) -> None:
    if "run_dir" not in fed.shared:
        pytest.skip("needs the interrupted run of the previous test")
    (private,) = (fed.workdir / "device-0").glob("*/private.npz")
    before = _digest(private)
    # SIGTERM: the SuperNode deactivates itself, so the same key can connect again at once (after
    # a SIGKILL the SuperLink refuses it until its heartbeat expires, ~1 minute)
    fed.stop_node(0, signal.SIGTERM)
    fed.add_node(0, 0, state_dir=fed.workdir / "device-0", key=fed.key(0))
    fed.wait_nodes(3)
    assert _digest(private) == before
    with np.load(private) as z:
        assert any(k.startswith("head") for k in z.files)  # FedPer's private head
    fed.shared["private0"] = before


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_with_a_supernode_killed_mid_round_completes(fed: Deployment) -> None:
    if "private0" not in fed.shared:
        pytest.skip("needs the interrupted run and the restarted SuperNode")
    run_dir: Path = fed.shared["run_dir"]
    seen = fed.nodes[2].log().count("Receiving: train message")
    run_id = fed.submit({**fed.shared["rc"], "resume": str(run_dir)})
    _wait_for(
        lambda: fed.nodes[2].log().count("Receiving: train message") > seen,
        RUN_TIMEOUT,
        "round 2's train message at SuperNode 2",
        fed,
    )
    # a hard kill mid-round (SuperNode and its ClientApps, no goodbye): the SuperLink notices
    # when its heartbeats stop (~1 minute in Flower 1.41) and answers for it with an error
    fed.stop_node(2, signal.SIGKILL)
    status, details = fed.wait_run(run_id, RUN_TIMEOUT)
    log = fed.run_log(run_id)
    assert status == "finished:completed", f"{status}: {details}\n{log[-3000:]}\n{fed.diagnostics()}"
    assert "resuming" in log and "after round 1" in log
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    r1, r2 = results["rounds"]
    assert sorted(r1["train"]["clients"]) == [0, 1, 2]
    assert sorted(r2["train"]["clients"]) == [0, 1]  # the round finished without client 2
    (lost,) = r2["train"]["failures"]  # and recorded who and why
    assert lost.startswith("client 2 ") and "Node Unavailable" in lost, lost
    assert sorted(r2["eval"]["per_client"], key=int) == ["0", "1"]
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"] == 2
    # client 0 trained on after its restart: its private head moved on from the surviving file
    (private,) = (fed.workdir / "device-0").glob("*/private.npz")
    assert _digest(private) != fed.shared["private0"]
