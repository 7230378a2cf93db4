"""Preparing a run: the app's ``pyproject.toml``, the run config checked (for a fedvit app resolved
and validated as the ServerApp will see it), the run directory known in advance, and the
``--federation-config`` (simulated SuperNodes, CPU/GPU shares, the simulation's environment)."""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fedvit.errors import ConfigError
from fedvit.launch.runconfig import absolutize_paths, toml_value
from fedvit.warmup import RUNTIME_ENV_HOOK

#: ``--federation-config`` keys Flower 1.41 knows (SimulationConfig, with ``-`` for ``_``).
FEDERATION_CONFIG_KEYS = (
    "num-supernodes",
    "client-resources-num-cpus",
    "client-resources-num-gpus",
    "backend",
    "verbose",
    "init-args-num-cpus",
    "init-args-num-gpus",
    "init-args-logging-level",
    "init-args-log-to-driver",
)
#: Read by ``ray.init``: a function that edits the runtime env (fedvit's adds a worker warm-up).
RAY_HOOK_VAR = "RAY_RUNTIME_ENV_HOOK"


def app_project(app_dir: str | Path) -> dict[str, Any]:
    """The app's ``pyproject.toml`` as a dict (:class:`ConfigError` if missing or broken)."""
    path = Path(app_dir) / "pyproject.toml"
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{Path(app_dir).resolve()} is not a Flower app (no pyproject.toml)") from None
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err


def _app_section(project: Mapping[str, Any]) -> Mapping[str, Any]:
    return project.get("tool", {}).get("flwr", {}).get("app", {})


def is_fedvit_app(project: Mapping[str, Any]) -> bool:
    """True when the app's ServerApp is fedvit's (then its run config is a fedvit config)."""
    serverapp = str(_app_section(project).get("components", {}).get("serverapp", ""))
    return serverapp.split(".")[0] == "fedvit"


@dataclass
class PreparedRun:
    """A run config ready to submit, and what the runner learned while checking it."""

    run_config: dict[str, Any]
    num_clients: int | None = None  # fedvit: clients.num_clients of the resolved config
    output_dir: Path | None = None  # fedvit: <output.dir>/<run-name>, or the resumed run dir
    cfg: Any = None  # fedvit: the resolved FedvitConfig


def prepare_run_config(
    app_dir: str | Path,
    run_config: Mapping[str, Any],
    *,
    cwd: str | Path | None = None,
    local_paths: bool = True,
    validate: bool | None = None,
) -> PreparedRun:
    """Check a run config against the app and, for fedvit apps, resolve and validate it.

    - keys must exist in the app's ``[tool.flwr.app.config]`` (as Flower demands);
    - ``local_paths``: relative path values become absolute against ``cwd``;
    - ``validate`` (``None``: when the app is fedvit's): the defaults of ``pyproject.toml`` fused
      with ``run_config`` go through :func:`fedvit.config.load_config`, exactly what the ServerApp
      will see. Then, for a local run, ``output-dir`` and ``data-dir`` are pinned to absolute
      paths and a ``run-name`` is chosen when none is set, so the run directory is known here.

    Every problem raises :class:`ConfigError`.
    """
    project = app_project(app_dir)
    defaults = dict(_app_section(project).get("config", {}))
    unknown = sorted(set(run_config) - set(defaults))
    if unknown:
        raise ConfigError(
            f"unknown run-config key(s) {unknown} for the app in {Path(app_dir).resolve()}; "
            f"known keys: {sorted(defaults)}"
        )
    rc = {k: v for k, v in run_config.items() if v is not None}
    for key, value in rc.items():
        toml_value(value, key)  # representable on Flower's command line?
    if local_paths:
        rc = absolutize_paths(rc, cwd)
    if validate is None:
        validate = is_fedvit_app(project)
    if not validate:
        return PreparedRun(rc)

    from fedvit.config import load_config
    from fedvit.preflight import check as preflight

    cfg = load_config({**defaults, **rc})
    if local_paths:  # data, partition, model checked before anything starts (remote: data is not here)
        preflight(cfg, cwd=cwd, release=True)
    prepared = PreparedRun(rc, num_clients=cfg.clients.num_clients, cfg=cfg)
    base = Path(cwd) if cwd is not None else Path.cwd()
    if cfg.server.resume:
        resume = Path(cfg.server.resume).expanduser()
        prepared.output_dir = resume if resume.is_absolute() or not local_paths else (base / resume).resolve()
        return prepared
    run_name = cfg.output.run_name or default_run_name(cfg.method.name, cfg.data.name)
    out_dir = Path(cfg.output.dir).expanduser()
    if local_paths:
        out_dir = out_dir if out_dir.is_absolute() else (base / out_dir).resolve()
        data_dir = Path(cfg.data.data_dir).expanduser()
        if "data-dir" in defaults and not data_dir.is_absolute():
            rc["data-dir"] = str((base / data_dir).resolve())
        if "output-dir" in defaults:
            rc["output-dir"] = str(out_dir)
    if "run-name" in defaults:
        rc["run-name"] = run_name
    prepared.output_dir = out_dir / run_name
    return prepared


def default_run_name(method: str, dataset: str) -> str:
    """``<method>-<dataset>-<YYYYmmdd-HHMMSS>`` (the ServerApp's own default)."""
    try:
        from fedvit.results import default_run_name as server_default

        return server_default(method, dataset)
    except ImportError:
        return f"{method}-{dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def federation_config(
    num_supernodes: int | None,
    cpus_per_client: float | None = 1,
    gpus_per_client: float | None = 0.0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``--federation-config`` dict; ``extra`` (the user's) wins. Unknown keys: ConfigError."""
    fed: dict[str, Any] = {}
    if num_supernodes is not None:
        fed["num-supernodes"] = int(num_supernodes)
    if cpus_per_client is not None:
        fed["client-resources-num-cpus"] = _num(cpus_per_client)
    if gpus_per_client:
        fed["client-resources-num-gpus"] = float(gpus_per_client)
    fed.update(extra or {})
    unknown = sorted(set(fed) - set(FEDERATION_CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown federation-config key(s) {unknown}; known: {list(FEDERATION_CONFIG_KEYS)}"
        )
    n = fed.get("num-supernodes")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ConfigError(f"federation-config 'num-supernodes' must be an integer >= 1, got {n!r}")
    return fed


#: Simulated SuperNodes per concurrently running client (see :func:`simulation_workers`).
WORKERS_PER_SLOT = 8
MIN_WORKERS = 32


#: Ray's switch for the workers its raylet starts when a driver connects (read by the raylet).
RAY_NO_PRESTART = "RAY_prestart_worker_first_driver"


def local_simulation_env(cpus_per_client: float = 1) -> dict[str, str]:
    """Environment of a local fedvit simulation, for what the user's environment does not set:
    Ray workers import the ClientApp as they start, while the ServerApp sets up
    (:mod:`fedvit.warmup`); and, with one CPU per client, one OpenMP/torch thread in every process
    (the ServerApp's cores belong to the workers; with more threads they spin against the workers'
    on a machine with no spare core). With more CPUs per client the variable is left to Ray,
    which gives each worker its ``num_cpus`` threads unless the environment already decides.
    Ray starts no workers when the simulation connects (:data:`RAY_NO_PRESTART`): the client
    actors need workers with the warm-up hook, so the prestarted ones were started, then killed
    about 2 s later, unused, on the cores the start-up is waiting for."""
    wanted = {RAY_HOOK_VAR: RUNTIME_ENV_HOOK, RAY_NO_PRESTART: "0"}
    if cpus_per_client <= 1:
        wanted["OMP_NUM_THREADS"] = "1"
    return {k: v for k, v in wanted.items() if k not in os.environ}


def simulation_workers(num_clients: int, cpus_per_client: float = 1, cpus: int | None = None) -> int:
    """How many SuperNodes a simulation starts: ``min(num_clients, max(32, 8 × slots))`` with
    ``slots = cpus / cpus_per_client`` clients running at once.

    Simulated nodes are *virtual workers*: each serves whichever client a message names (see
    ``fedvit.client_app.is_virtual_worker``), so results do not depend on their number. Flower's
    own cost per message grows with the number of nodes (its simulation scans every node's queue
    every 0.1 s, taking one message per node per pass); a few workers per running client keep that
    scan small while never starving a core (each pass hands out up to one message per worker)."""
    slots = max(1.0, (cpus if cpus is not None else os.cpu_count() or 1) / max(cpus_per_client, 1e-9))
    return int(min(num_clients, max(MIN_WORKERS, math.ceil(WORKERS_PER_SLOT * slots))))


def auto_gpus_per_client(cfg: Any, num_supernodes: int | None, available: float | None = None) -> float:
    """GPU share per simulated client so that all clients fit on the GPUs (0: none).

    ``available``: the GPUs to share (a Ray cluster's total); default this machine's visible ones.
    """
    if cfg is None or not num_supernodes or cfg.clients.device == "cpu":
        return 0.0
    gpus = visible_gpus() if available is None else available
    if gpus == 0:
        return 0.0
    return math.floor(min(1.0, gpus / num_supernodes) * 10_000) / 10_000  # Ray: 4 decimals


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)
