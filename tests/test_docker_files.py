"""``docker/``: every compose file is valid against the compose-spec schema (offline, the copy
vendored by check-jsonschema), and its commands and ports are the ones :mod:`fedvit.deploy`
builds, which is what ``tests/test_deployment.py`` starts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import deployhelpers
import pytest
import yaml

from fedvit import deploy

DOCKER = Path(__file__).resolve().parents[1] / "docker"
COMPOSE_FILES = sorted(DOCKER.glob("compose*.yml"))
NODES = (0, 1, 2)
LINK = f"superlink:{deploy.SUPERLINK_PORT}"
DB = "/app/state/state.db"
ISOLATION = ["--isolation", "process"]  # the ServerApp runs in the `serverapp` service


def _load(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def _check_jsonschema() -> str:
    exe = Path(sys.executable).parent / "check-jsonschema"
    if exe.is_file():
        return str(exe)
    found = shutil.which("check-jsonschema")
    if found is None:
        pytest.skip("check-jsonschema is not installed (pip install -e '.[test]')")
    return found


def test_the_three_compose_files_exist() -> None:
    assert [p.name for p in COMPOSE_FILES] == ["compose.gpu.yml", "compose.tls.yml", "compose.yml"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_is_valid_against_the_compose_spec(path: Path) -> None:
    res = subprocess.run(
        [_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def _node_cfg(i: int) -> str:
    return deploy.node_config(i, state_dir="/app/state")


def test_plain_compose_runs_the_deploy_commands() -> None:
    services = _load("compose.yml")["services"]
    assert services["superlink"]["image"] == f"flwr/superlink:{deploy.FLOWER_VERSION}"
    expected = deploy.superlink_args(port=deploy.SUPERLINK_PORT, database=DB) + ISOLATION
    assert services["superlink"]["command"] == expected
    assert services["superlink"]["ports"] == [f"{deploy.SUPERLINK_PORT}:{deploy.SUPERLINK_PORT}"]
    assert services["serverapp"]["command"] == deploy.superexec_args(LINK)
    for i in NODES:
        node = services[f"supernode-{i}"]
        assert node["command"] == deploy.supernode_args(LINK, _node_cfg(i), port=deploy.SUPERNODE_PORT)
        assert f"supernode-{i}-state:/app/state" in node["volumes"]  # the personal model survives restarts
        assert node["image"].startswith("fedvit-supernode:")
        assert node["build"]["dockerfile"] == "docker/Dockerfile.supernode"


def test_tls_compose_runs_the_deploy_commands_with_tls_and_node_auth() -> None:
    services = _load("compose.tls.yml")["services"]
    certs = deploy.CERTS_DIR
    assert (
        services["superlink"]["command"]
        == deploy.superlink_args(port=deploy.SUPERLINK_PORT, certs=certs, auth=True, database=DB) + ISOLATION
    )
    assert services["serverapp"]["command"] == deploy.superexec_args(LINK, certs=certs)
    for i in NODES:
        node = services[f"supernode-{i}"]
        key = f"{certs}/{deploy.supernode_key(i)}"
        assert node["command"] == deploy.supernode_args(LINK, _node_cfg(i), certs=certs, key=key)
        assert f"./certs:{certs}:ro" in node["volumes"]
    # the flags the deployment test starts its TLS + auth SuperLink with, whatever the paths
    tested = deployhelpers.superlink_args("10.0.0.1", deploy.SUPERLINK_PORT, Path("/c"), True, Path("/w"))
    flags = {a for a in services["superlink"]["command"] if a.startswith("--")} - {"--isolation"}
    assert flags == {a for a in tested if a.startswith("--")}
    assert tested[tested.index("--port") + 1] == str(deploy.SUPERLINK_PORT)


def test_gpu_compose_gives_each_supernode_one_gpu_and_the_cuda_image() -> None:
    services = _load("compose.gpu.yml")["services"]
    for i in NODES:
        node = services[f"supernode-{i}"]
        assert node["build"]["dockerfile"] == "docker/Dockerfile.supernode-gpu"
        (dev,) = node["deploy"]["resources"]["reservations"]["devices"]
        assert dev["device_ids"] == [str(i)] and "gpu" in dev["capabilities"]
        assert "command" not in node  # composes with compose.tls.yml


@pytest.mark.parametrize(
    ("dockerfile", "base"),
    [
        ("Dockerfile.superexec", f"flwr/superexec:{deploy.FLOWER_VERSION}"),
        ("Dockerfile.supernode", f"flwr/supernode:{deploy.FLOWER_VERSION}"),
    ],
)
def test_images_build_on_flowers_official_images(dockerfile: str, base: str) -> None:
    lines = (DOCKER / dockerfile).read_text().splitlines()
    assert f"FROM {base}" in lines
    services = _load("compose.yml")["services"].values()
    referenced = {c["build"]["dockerfile"] for c in services if "build" in c}
    assert f"docker/{dockerfile}" in referenced


def test_make_certs_script_names_match_deploy() -> None:
    text = (DOCKER.parent / "scripts" / "make_certs.sh").read_text()
    for name in (deploy.CA_CERT, deploy.SERVER_CERT, deploy.SERVER_KEY, "supernode-$i"):
        assert name in text
