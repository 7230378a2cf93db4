"""Run a Flower app with ``flwr run`` and fail loudly: the engine behind ``fedvit run``.

``flwr run`` alone has three traits that make it a poor batch tool: it exits 0 even when the
run failed, it needs a SuperLink (the ``:local:`` address spawns a detached one that outlives
the run, on fixed ports), and it interprets relative paths in the run config against the
SuperLink's working directory. :func:`run_flwr` wraps it:

1. The run config is parsed and checked here first (for a fedvit app: composed and validated
   with :func:`fedvit.config.load_config`), so a typo fails in well under a second with one
   :class:`~fedvit.config.ConfigError`, not inside Ray. Relative ``data-dir`` / ``output-dir``
   / ``resume`` paths become absolute against the caller's working directory, and a
   ``run-name`` is chosen when none is given, so the caller knows where the results go.
2. Unless ``superlink`` names an existing connection, a private SuperLink is started
   (:class:`LocalSuperLink`): its own ``FLWR_HOME`` with a ``config.toml`` that points at it,
   a free port, its own database and Ray temp dir. Two runs at once do not collide.
3. The run is submitted (``flwr run <app> <connection> --format json``), its logs are streamed
   (``flwr log <id> --stream``), and the final status comes from ``flwr ls --run-id <id>``.
   Anything but ``finished:completed`` is a failure (:attr:`RunOutcome.ok` is false).
4. The SuperLink and everything it started (SuperExec, ``flwr-simulation``, the Ray cluster and
   its workers) are torn down on every exit path: success, failure, timeout, Ctrl-C, SIGTERM.
   Processes are found by an environment tag they all inherit, not by their process group
   (SuperExec starts its own session).
5. If the launcher (the process that called :func:`run_flwr`) dies without tearing down, by any
   signal, SIGKILL included, its watchdog (:mod:`fedvit.launch.watchdog`, started first) kills
   everything the run started and removes the SuperLink's work dir; and the next run reaps what
   a launcher whose watchdog died too left behind (:func:`fedvit.launch.procs.reap_orphans`),
   saying so in one line.

Deployment: ``superlink="<name>"`` submits to a connection of the caller's ``FLWR_HOME``
``config.toml`` (remote address, TLS root certificate ...); nothing is started, nothing is
killed, and paths are passed as given (they are paths on the SuperLink's machine).

The parts live in :mod:`fedvit.launch`, one concern per module (run-config text, preparing a run,
processes, the SuperLink, a Ray cluster, the session with the ``flwr`` CLI, the watchdog); this
module runs them in order and re-exports the names other modules use.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from fedvit.errors import ConfigError
from fedvit.launch.errors import RunnerError
from fedvit.launch.prepare import (
    FEDERATION_CONFIG_KEYS,
    MIN_WORKERS,
    RAY_HOOK_VAR,
    WORKERS_PER_SLOT,
    PreparedRun,
    app_project,
    auto_gpus_per_client,
    default_run_name,
    federation_config,
    is_fedvit_app,
    local_simulation_env,
    prepare_run_config,
    simulation_workers,
    visible_gpus,
)
from fedvit.launch.procs import (
    LAUNCHER_VAR,
    RESERVED_PORTS,
    TAG_VAR,
    WORKDIR_VAR,
    Proc,
    Reaped,
    all_procs,
    descendants,
    find_free_port,
    kill_processes,
    launcher_id,
    listening_inodes,
    owns_listening_port,
    proc_environ,
    read_proc,
    reap_orphans,
    tagged_processes,
)
from fedvit.launch.ray_cluster import (
    CLUSTER_REFUSED_KEYS,
    RAY_ADDRESS_VAR,
    RayCluster,
    RayNode,
    _say_cluster,
    check_ray_cluster,
    client_state_root,
    cluster_paths,
    parse_ray_address,
)
from fedvit.launch.ray_head import RayHeadSpec
from fedvit.launch.runconfig import (
    PATH_DOTKEYS,
    PATH_KEYS,
    absolutize_paths,
    format_kv,
    format_run_config,
    load_kv_args,
    parse_kv_string,
    toml_value,
)
from fedvit.launch.session import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    LOG_NOISE,
    NOISE_NOTE,
    STATUS_COMPLETED,
    STATUS_NOT_SUBMITTED,
    STATUS_TIMEOUT,
    STATUS_UNKNOWN,
    PrimedFlwr,
    RunOutcome,
    _flwr,
    _LogPump,
    _Session,
    describe,
    is_final,
    is_noise,
    parse_ls_json,
    parse_submit_json,
    strip_ansi,
)
from fedvit.launch.signals import Terminated as _Terminated
from fedvit.launch.signals import deferred_signals as _deferred_signals
from fedvit.launch.signals import signals_raise
from fedvit.launch.superlink import (
    FLWR_ENV,
    LOCAL_CONNECTION,
    LocalSuperLink,
    bin_dir,
    flwr_env,
    flwr_executable,
    local_superlink,
)
from fedvit.launch.watchdog import Watchdog

__all__ = [
    "CLUSTER_REFUSED_KEYS",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "FEDERATION_CONFIG_KEYS",
    "FLWR_ENV",
    "LAUNCHER_VAR",
    "LOCAL_CONNECTION",
    "LOG_NOISE",
    "MIN_WORKERS",
    "NOISE_NOTE",
    "PATH_DOTKEYS",
    "PATH_KEYS",
    "RAY_ADDRESS_VAR",
    "RAY_HOOK_VAR",
    "RESERVED_PORTS",
    "STATUS_COMPLETED",
    "STATUS_NOT_SUBMITTED",
    "STATUS_TIMEOUT",
    "STATUS_UNKNOWN",
    "TAG_VAR",
    "WORKDIR_VAR",
    "WORKERS_PER_SLOT",
    "ConfigError",
    "LocalSuperLink",
    "PreparedRun",
    "PrimedFlwr",
    "Proc",
    "RayCluster",
    "RayNode",
    "Reaped",
    "RunOutcome",
    "RunnerError",
    "Watchdog",
    "_LogPump",
    "_Session",
    "_Terminated",
    "_deferred_signals",
    "_flwr",
    "_say_cluster",
    "absolutize_paths",
    "all_procs",
    "app_project",
    "auto_gpus_per_client",
    "bin_dir",
    "check_ray_cluster",
    "client_state_root",
    "cluster_paths",
    "default_run_name",
    "descendants",
    "describe",
    "federation_config",
    "find_free_port",
    "flwr_env",
    "flwr_executable",
    "format_kv",
    "format_run_config",
    "is_fedvit_app",
    "is_final",
    "is_noise",
    "kill_processes",
    "launcher_id",
    "listening_inodes",
    "load_kv_args",
    "local_simulation_env",
    "local_superlink",
    "owns_listening_port",
    "parse_kv_string",
    "parse_ls_json",
    "parse_ray_address",
    "parse_submit_json",
    "prepare_run_config",
    "proc_environ",
    "read_proc",
    "reap_orphans",
    "run_flwr",
    "simulation_workers",
    "strip_ansi",
    "tagged_processes",
    "toml_value",
    "visible_gpus",
]


def run_flwr(
    app_dir: str | Path,
    run_config: Mapping[str, Any],
    *,
    num_supernodes: int | None = None,
    cpus_per_client: float = 1,
    gpus_per_client: float | None = 0.0,
    federation_config_extra: Mapping[str, Any] | None = None,
    superlink: str | None = None,
    ray_address: str | None = None,
    flwr_home: str | Path | None = None,
    timeout_s: float | None = None,
    stream: bool = True,
    env_extra: Mapping[str, str] | None = None,
    validate: bool | None = None,
    cwd: str | Path | None = None,
    log_sink: TextIO | None = None,
    progress: Callable[[str], None] | None = None,
    status_timeout_s: float = 120.0,
    private_ray_head: bool = True,
) -> RunOutcome:
    """Run a Flower app to its end and report its final status.

    ``num_supernodes``: simulated SuperNodes; ``None`` = for a fedvit app :func:`simulation_workers`
    (virtual workers serving its ``clients.num_clients`` clients)
    (local runs; required for other apps), not sent for a remote ``superlink``.
    ``federation_config_extra``: more ``--federation-config`` keys (they win).
    ``superlink``: ``None`` starts a private SuperLink (see the module doc); a name submits to
    that connection of ``FLWR_HOME``. ``ray_address``: ``HOST:PORT`` of a running Ray cluster's
    head (``ray start --head``) for the simulation to join, so clients run on all its nodes
    (Flower's RayBackend calls ``ray.init()``, which reads :data:`RAY_ADDRESS_VAR`); default
    ``$RAY_ADDRESS``, else a private Ray instance on this machine. The cluster is checked first
    (:func:`check_ray_cluster`). ``private_ray_head``: for a local simulation without ``ray_address``,
    start that private Ray instance as a head of its own at the same time as the SuperLink
    (:mod:`fedvit.launch.ray_head`: the client workers then start while the ServerApp sets up)
    instead of letting Flower start it after the ServerApp; ``init-args-num-cpus/gpus`` size
    the head. ``flwr_home``: the ``FLWR_HOME`` to use (local runs: the
    private one the runner writes, kept afterwards; default a temp dir).
    ``gpus_per_client``: Ray's GPU share per simulated client (Ray hides the GPUs from clients
    that get none); ``None`` = auto: for a fedvit app whose ``clients.device`` is not ``cpu`` and
    a machine with GPUs, the visible GPUs are shared evenly by the clients, else 0.
    ``timeout_s``: the whole run (SuperLink start to final status); then the run is stopped and
    the outcome is ``timeout`` (exit code 124). ``stream``: echo the run's log to ``log_sink``
    (default stdout). ``env_extra``: added to the environment of every process (e.g.
    ``CUDA_VISIBLE_DEVICES``). ``validate``: see :func:`prepare_run_config`. ``cwd``: what
    relative paths are relative to (default: the current directory). ``progress``: called with
    one-line messages (SuperLink started, run submitted ...). ``status_timeout_s``: give up after
    this long without an answer to ``flwr ls``.

    Config problems raise :class:`ConfigError` before anything starts; a SuperLink or private Ray head
    that does not come up raises :class:`RunnerError`; Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM/SIGHUP
    ``SystemExit(128 + signal)``, after teardown. Everything else is in the :class:`RunOutcome`.
    Should this process die without teardown (SIGKILL ...), its watchdog does it; leftovers of
    launchers that died with their watchdog are reaped first, in one line to ``progress`` (else
    stderr).
    """
    t0 = time.monotonic()
    app = Path(app_dir).expanduser().resolve()
    here = Path(cwd).expanduser().resolve() if cwd is not None else Path.cwd()
    local = superlink is None
    say = progress or (lambda _msg: None)
    launcher = launcher_id()  # on every process this run starts (see fedvit.launch.procs)
    env_extra = {**(env_extra or {}), LAUNCHER_VAR: launcher}

    if ray_address is None and local:
        ray_address = os.environ.get(RAY_ADDRESS_VAR) or None  # what ray.init() would take anyway
    if ray_address is not None:
        if not local:
            raise ConfigError(
                "a Ray address applies to simulations started here; with --superlink the SuperLink's "
                "machine decides where clients run"
            )
        ray_address = parse_ray_address(ray_address)
        refused = [k for k in CLUSTER_REFUSED_KEYS if k in (federation_config_extra or {})]
        if refused:
            raise ConfigError(
                f"federation-config {refused} cannot be used with a Ray cluster (Ray refuses them when it "
                "joins one): each node's resources are what `ray start --num-cpus/--num-gpus` declared"
            )
    prepared = prepare_run_config(app, run_config, cwd=here, local_paths=local, validate=validate)
    if local and num_supernodes is None and prepared.num_clients is not None:
        extra_n = (federation_config_extra or {}).get("num-supernodes")
        num_supernodes = extra_n or simulation_workers(prepared.num_clients, cpus_per_client)
    fed = federation_config(
        num_supernodes, cpus_per_client if local else None, gpus_per_client or 0.0, federation_config_extra
    )
    cluster = None
    if ray_address is not None:
        say(f"checking the Ray cluster at {ray_address} ...")
        env = flwr_env(flwr_home, env_extra)
        cluster = check_ray_cluster(ray_address, prepared, cwd=here, env=env, say=say)
        env_extra = {**env_extra, RAY_ADDRESS_VAR: ray_address}
    if gpus_per_client is None and local and "client-resources-num-gpus" not in fed:
        auto = auto_gpus_per_client(
            prepared.cfg, fed.get("num-supernodes"), None if cluster is None else cluster.gpus
        )
        if auto > 0:
            fed["client-resources-num-gpus"] = auto
            say(f"{auto:g} GPU per client (clients.device={prepared.cfg.clients.device})")
    if local:
        n = fed.get("num-supernodes")
        if n is None:
            raise ConfigError("federation-config 'num-supernodes' is required for apps other than fedvit")
        if prepared.num_clients is not None and n > prepared.num_clients:
            raise ConfigError(
                f"federation-config num-supernodes={n} but clients.num_clients={prepared.num_clients}: "
                "simulated SuperNodes are workers that serve the clients, at most one per client; "
                f"set the run-config key num-clients={n} (or leave num-supernodes out)"
            )
    if cluster is not None:
        _say_cluster(cluster, fed, say)
    if local and prepared.cfg is not None:
        env_extra = {**local_simulation_env(cpus_per_client), **env_extra}
    head = RayHeadSpec.take_from(fed) if local and ray_address is None and private_ray_head else None
    if prepared.output_dir is not None:
        say(f"results will go to {prepared.output_dir}")
    args = ["run", str(app)]
    rc_text = format_run_config(prepared.run_config)
    fed_text = format_kv(fed, "federation-config")

    outcome = RunOutcome(
        run_id=None,
        status=STATUS_NOT_SUBMITTED,
        details="",
        returncode=EXIT_FAILED,
        run_config=prepared.run_config,
        output_dir=prepared.output_dir,
    )
    sink = (log_sink if log_sink is not None else sys.stdout) if stream else None
    reaped = reap_orphans()  # what launchers that died before us left running
    if reaped is not None:
        line = f"fedvit: {reaped.line()}"
        if progress is not None:
            say(line)
        else:
            print(line, file=sys.stderr, flush=True)
    try:
        with signals_raise(), contextlib.ExitStack() as stack:
            # First: should this process die by any signal, its watchdog tears the run down.
            watchdog = Watchdog.start(launcher)
            stack.callback(watchdog.release)
            primed = PrimedFlwr(flwr_env(flwr_home, env_extra), here)  # `flwr run`, ready when needed
            stack.callback(primed.close)
            if local:
                say("starting a private SuperLink ...")
                link = stack.enter_context(
                    local_superlink(
                        flwr_home=flwr_home, env_extra=env_extra, cwd=here, watchdog=watchdog, ray_head=head
                    )
                )
                env, connection = link.env(), link.connection
                outcome.superlink = f"{connection} ({link.address}, started here)"
                head_text = "" if link.ray_head is None else f"; Ray head at {link.ray_head.address}"
                say(f"SuperLink up at {link.address} (state in {link.workdir}{head_text})")
            else:
                link = None
                env = flwr_env(flwr_home, env_extra)
                connection = str(superlink)
                outcome.superlink = connection
            session = _Session(
                connection=connection,
                env=env,
                cwd=here,
                deadline=None if timeout_s is None else t0 + timeout_s,
                remote=not local,
                status_timeout_s=status_timeout_s,
                say=say,
                link=link,
                primed=primed,
            )
            args += [connection, "--format", "json"]
            if rc_text:
                args += ["--run-config", rc_text]
            if fed_text:
                args += ["--federation-config", fed_text]
            session.submit_and_wait(args, sink, outcome)
    finally:
        outcome.elapsed_s = time.monotonic() - t0
    return outcome
