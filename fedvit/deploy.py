"""The commands of a fedvit deployment, in one place.

The multi-node tests (``tests/test_deployment.py``), the compose files (``docker/compose*.yml``,
checked by ``tests/test_docker_files.py``) and the guide (``docs/deployment.md``) all start
the SuperLink and the SuperNodes with the arguments built here, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

#: The SuperLink's one HTTP port (Fleet, Control and ServerAppIo APIs in Flower 1.41).
SUPERLINK_PORT = 9093
#: The port a SuperNode serves its ClientAppIo API on (for its ClientApp processes).
SUPERNODE_PORT = 9094
#: The Flower version every image and process must have.
FLOWER_VERSION = "1.41.0"
#: Where the TLS files live inside the containers (``scripts/make_certs.sh`` output mounted here).
CERTS_DIR = "/app/certs"

#: File names written by ``scripts/make_certs.sh``.
CA_CERT = "ca.crt"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


def supernode_key(index: int) -> str:
    """File name of SuperNode ``index``'s private authentication key (``.pub``: the public one)."""
    return f"supernode-{index}"


def superlink_args(
    *,
    host: str = "0.0.0.0",
    port: int = SUPERLINK_PORT,
    certs: str | None = None,
    auth: bool = False,
    database: str | None = None,
) -> list[str]:
    """Arguments of ``flower-superlink`` (without the executable).

    ``certs``: directory of ``make_certs.sh`` output (TLS); ``None`` = ``--insecure``.
    ``auth``: only registered SuperNodes may connect (``flwr supernode register``; needs TLS).
    """
    args = []
    if certs is None:
        if auth:
            raise ValueError("SuperNode authentication needs TLS (certs)")
        args.append("--insecure")
    else:
        d = PurePosixPath(certs)
        args += [
            "--ssl-ca-certfile",
            str(d / CA_CERT),
            "--ssl-certfile",
            str(d / SERVER_CERT),
            "--ssl-keyfile",
            str(d / SERVER_KEY),
        ]
        if auth:
            args.append("--enable-supernode-auth")
    args += ["--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    if database is not None:
        args += ["--database", database]
    return args


def node_config(
    client_id: int, *, state_dir: str, data_path: str | None = None, device: str | None = None
) -> str:
    """The ``--node-config`` text of one device (keys read by :mod:`fedvit.client_app`)."""
    items: dict[str, Any] = {"client-id": client_id}
    if data_path:
        items["data-path"] = data_path
    items["state-dir"] = state_dir
    if device:
        items["device"] = device
    return " ".join(f"{k}={v}" if isinstance(v, int) else f"{k}='{v}'" for k, v in items.items())


def supernode_args(
    superlink: str,
    node_cfg: str,
    *,
    port: int = SUPERNODE_PORT,
    certs: str | None = None,
    key: str | None = None,
    max_wait_s: float | None = None,
) -> list[str]:
    """Arguments of ``flower-supernode`` (without the executable).

    ``superlink``: ``host:port``; ``certs``: directory holding ``ca.crt`` (TLS), ``None`` =
    ``--insecure``; ``key``: path of this node's private authentication key;
    ``max_wait_s``: give up connecting after this long (default: retry forever).
    """
    args = ["--insecure"] if certs is None else ["--root-certificates", str(PurePosixPath(certs) / CA_CERT)]
    args += ["--superlink", superlink]
    if key is not None:
        args += ["--auth-supernode-private-key", key]
    args += ["--port", str(port), "--node-config", node_cfg]
    if max_wait_s is not None:
        args += ["--max-wait-time", f"{max_wait_s:g}"]
    return args


def superexec_args(superlink: str, *, certs: str | None = None) -> list[str]:
    """Arguments of ``flower-superexec`` (the ServerApp's runtime next to a SuperLink started
    with ``--isolation process``, as in ``docker/compose.yml``)."""
    tls = ["--insecure"] if certs is None else ["--root-certificates", str(PurePosixPath(certs) / CA_CERT)]
    return [*tls, "--runtime-api-address", superlink]


def connection_toml(name: str, address: str, root_certificates: str | None = None) -> str:
    """A ``[superlink.<name>]`` section of ``$FLWR_HOME/config.toml`` for ``flwr run``/``ls``/``log``."""
    lines = [f"[superlink.{name}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true")
    return "\n".join(lines) + "\n"


def flwr_config_toml(connections: Mapping[str, str], default: str) -> str:
    """A whole ``config.toml``: ``connections`` maps names to sections from :func:`connection_toml`."""
    return f'[superlink]\ndefault = "{default}"\n\n' + "\n".join(connections.values())
