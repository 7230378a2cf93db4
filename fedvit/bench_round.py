"""``fedvit bench round``: a federation's round time against its two yardsticks, as JSON.

One setting (a run config, as for ``fedvit run``) is measured in three steps, one after the other:

1. **The real federation**: :func:`fedvit.runner.run_flwr` (private SuperLink, Ray simulation,
   ``client-resources-num-cpus=1``). Round ``r`` takes ``elapsed_s[r] - elapsed_s[r-1]`` of the
   run's ``results.json`` (``elapsed_s`` counts from the ServerApp's recorder start, so round 1
   also holds discovery); the **steady round** is the median of rounds >= 2. While the run goes,
   a sampler thread reads ``/proc`` every ``SAMPLE_S`` seconds: the summed RSS of every process the
   run started (the descendants of this process and every process tagged with the
   runner's ``FEDVIT_RUNNER_TAG``: SuperLink, SuperExec, ServerApp, Ray, its workers, the ``flwr``
   CLI) and ``results.json`` while its status is ``running``: the file's mtime minus its last
   round's ``elapsed_s`` is the recorder's start on this machine's clock, which places the end of
   round 1 on the same clock as the call to ``run_flwr``.
2. **The pure-compute bound**: the config's model, torch threads = 1, random inputs of the
   config's shape, batch = ``train.batch_size``, the config's optimizer (and gradient clipping)
   from :mod:`fedvit.training`: seconds per image of a train step and of an eval forward, timed as
   ``tools/round_bound.py`` does. bound = (images trained x t_train + images evaluated x t_eval)
   / cores, with the images of the real partition: expected per round = (messages / N) x the
   images of all N clients (exact when every client takes part).
3. **Flower's floor**: a no-op ClientApp in the same Ray simulation engine (``run_simulation``),
   N nodes, one ``evaluate`` message per node per round carrying the shared split's float count,
   in a subprocess (``python -m fedvit.bench_round --floor ...``), as ``tools/flower_floor.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fedvit.config import ConfigError, FedvitConfig
from fedvit.worker import TRACE_ENV

REPO = Path(__file__).resolve().parents[1]
SAMPLE_S = 1.0  # /proc sampling period of the run's process tree (a sample costs ~10 ms of CPU)
FLOOR_MESSAGES = 400  # steady messages the floor aims to time (at least 2 rounds after a warm-up)


# --------------------------------------------------------------------------- pure compute


def images_per_client_round(n_train: int, cfg: FedvitConfig) -> int:
    """Training images one client processes in a round (``local_steps`` or ``local_epochs``)."""
    tc = cfg.train
    if tc.local_steps is None:
        return tc.local_epochs * n_train
    per_epoch = math.ceil(n_train / tc.batch_size)  # batches of one pass; the last may be short
    full, rest = divmod(tc.local_steps, per_epoch)
    return full * n_train + rest * tc.batch_size


def bound_seconds(n_train: float, n_eval: float, t_train: float, t_eval: float, cores: int) -> float:
    """Perfectly packed compute of a round: ``(n_train t_train + n_eval t_eval) / cores``."""
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    return (n_train * t_train + n_eval * t_eval) / cores


def step_costs(cfg: FedvitConfig, seconds: float = 8.0, batch: int | None = None) -> dict[str, Any]:
    """Seconds per image of a train step and of an eval forward of ``cfg``'s model, 1 thread.

    The loop of ``tools/round_bound.py``: 3 warm-up steps, then steps until ``seconds`` passed;
    random inputs, ``batch`` (default ``train.batch_size``) images per step. The train step is
    cross-entropy, backward, the gradient clipping of ``train.grad_clip`` and a step of the
    optimizer :func:`fedvit.training.make_optimizer` builds from ``cfg.train``.
    """
    import torch

    from fedvit.models import build_model, example_input
    from fedvit.training import make_optimizer

    if cfg.model.arch != "vit":
        raise ConfigError(
            f"bench round: the compute bound needs an image model, model.arch is {cfg.model.arch}"
        )
    bs = batch or cfg.train.batch_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, cfg.train)
        x = torch.randn_like(example_input(cfg, bs))
        y = torch.randint(0, cfg.data.num_classes, (bs,))
        clip = cfg.train.grad_clip

        def train_step() -> None:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()

        def eval_step() -> None:
            with torch.inference_mode():
                model(x).argmax(1)

        def per_image(fn: Callable[[], None]) -> float:
            for _ in range(3):
                fn()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                fn()
                n += 1
            return (time.perf_counter() - t0) / (n * bs)

        model.train()
        t_train = per_image(train_step)
        model.eval()
        t_eval = per_image(eval_step)
    finally:
        torch.set_num_threads(threads)
    return {
        "train_s_per_image": t_train,
        "eval_s_per_image": t_eval,
        "batch_size": bs,
        "torch_threads": 1,
        "seconds_per_measure": seconds,
        "model_params": sum(p.numel() for p in model.parameters()),
    }


def concurrent_step_costs(cfg: FedvitConfig, procs: int, seconds: float = 8.0) -> dict[str, Any]:
    """:func:`step_costs` in ``procs`` processes at once (1 thread each), as the round runs its
    workers: what the same steps cost when every core is busy (shared caches, memory bandwidth,
    the host's scheduling of this VM's cores). Per-image seconds, the mean over the processes."""
    import pickle

    with tempfile.TemporaryDirectory(prefix="fedvit-costs-") as tmp:
        cfg_path = Path(tmp) / "cfg.pkl"
        cfg_path.write_bytes(pickle.dumps(cfg))
        cmd = [sys.executable, "-m", "fedvit.bench_round", "--costs", str(cfg_path), str(seconds)]
        children = [
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(procs)
        ]
        outs = [c.communicate(timeout=20 * seconds + 120) for c in children]
    for child, (_out, err) in zip(children, outs, strict=True):
        if child.returncode != 0:
            raise RuntimeError(f"bench round: concurrent step costs failed: {err.strip()[-500:]}")
    costs = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    return {
        "processes": procs,
        "train_s_per_image": statistics.fmean(c["train_s_per_image"] for c in costs),
        "eval_s_per_image": statistics.fmean(c["eval_s_per_image"] for c in costs),
    }


def read_traces(directory: Path) -> list[dict[str, Any]]:
    """The messages :func:`fedvit.worker.traced` recorded under ``directory`` (all processes)."""
    records = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a killed worker
                records.append(json.loads(line))
    return records


def worker_usage(
    records: Sequence[Mapping[str, Any]],
    windows: Sequence[tuple[float, float]],
    slots: int,
    bounds: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Where each round's time went, from the workers' message records.

    ``windows``: each round's ``(start, end)`` on ``time.time()``'s clock; ``slots``: the workers
    that run at once. Per round: ``busy_s`` (sum over messages of their wall time inside the
    window), ``cpu_s`` (the CPU seconds of the messages that ended in it), ``idle_s`` = slots x
    round - busy (no message in a worker: Flower's hand-over, barriers, imbalance). With the
    round's compute bound B, round - B splits exactly into ``above_bound_work_s`` = cpu/slots - B
    (the workers' CPU beyond the pure compute), ``waiting_in_message_s`` = (busy - cpu)/slots
    (a message waiting for a core or the disk) and ``idle_per_slot_s`` = idle/slots.
    """
    out = []
    for i, (start, end) in enumerate(windows):
        length = end - start
        busy = sum(max(0.0, min(r["t1"], end) - max(r["t0"], start)) for r in records)
        ended = [r for r in records if start < r["t1"] <= end]
        cpu = sum(r["cpu_s"] for r in ended)
        row: dict[str, Any] = {
            "round_s": _r(length),
            "messages": len(ended),
            "busy_s": _r(busy),
            "cpu_s": _r(cpu),
            "idle_s": _r(slots * length - busy),
        }
        if bounds is not None:
            row["bound_s"] = _r(bounds[i])
            row["above_bound_work_s"] = _r(cpu / slots - bounds[i])
            row["waiting_in_message_s"] = _r((busy - cpu) / slots)
            row["idle_per_slot_s"] = _r((slots * length - busy) / slots)
        out.append(row)
    return out


def client_sizes(cfg: FedvitConfig) -> list[dict[str, int]]:
    """Per client: training images of a round (``train``) and evaluated images (``eval``: val + test)."""
    from fedvit.data import build_partition

    part = build_partition(cfg)
    return [
        {
            "train": images_per_client_round(len(part.train[k]), cfg),
            "eval": len(part.val[k]) + len(part.test[k]),
        }
        for k in range(part.num_clients)
    ]


# --------------------------------------------------------------------------- Flower's floor


def floor_child(n: int, floats: int, rounds: int, cpus: int) -> dict[str, Any]:
    """The floor's child: ``rounds`` rounds of one ``evaluate`` message to each of ``n`` no-op nodes."""
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

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
        arrays = ArrayRecord({"w": Array(np.zeros(max(1, floats), dtype=np.float32))})
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


# --------------------------------------------------------------------------- watching the run


def _statm_rss_bytes(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


class RunWatcher:
    """Samples the run's process tree from ``/proc`` and notes when ``results.json`` records rounds.

    Cheap on purpose (it runs beside the measured run): ``/proc/<pid>/stat`` of every process,
    the environment of each process once, ``statm`` of the run's processes. Not PSS: reading
    ``smaps_rollup`` costs ~3 ms of kernel time per large process and sample.
    """

    def __init__(self, results: Path, period_s: float = SAMPLE_S) -> None:
        self.results = results
        self.period_s = period_s
        self.peak_rss = 0
        self.peak_procs = 0
        self.samples = 0
        self.recorder_t0: float | None = None  # time.time() of the ServerApp recorder's start
        self._tag: str | None = None
        self._tags: dict[tuple[int, int], str | None] = {}  # (pid, start) -> its runner tag
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RunWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a process may vanish between two reads
                self.sample()
            self._stop.wait(self.period_s)

    def processes(self) -> list[int]:
        """Pids of the run: this process's descendants and the runner-tagged ones (not this one)."""
        from fedvit.runner import TAG_VAR, all_procs, descendants, proc_environ

        me = os.getpid()
        procs = [p for p in all_procs() if p.state not in "ZX"]
        tags = {}
        for p in procs:
            key = (p.pid, p.start)
            if key not in self._tags:
                self._tags[key] = proc_environ(p.pid).get(TAG_VAR)
            tags[key] = self._tags[key]
        self._tags = tags  # forget the dead
        pids = {p.pid for p in descendants(me, procs)} - {me}
        if self._tag is None:
            self._tag = next(
                (tags[(p.pid, p.start)] for p in procs if p.pid in pids and tags[(p.pid, p.start)]), None
            )
        if self._tag is not None:
            pids |= {p.pid for p in procs if p.pid != me and tags[(p.pid, p.start)] == self._tag}
        return sorted(pids)

    def sample(self) -> None:
        pids = self.processes()
        rss = sum(_statm_rss_bytes(p) or 0 for p in pids)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, len(pids))
        self.samples += 1
        if self.recorder_t0 is None and self.results.is_file():
            mtime = self.results.stat().st_mtime
            data = json.loads(self.results.read_text())
            timed = [r for r in data.get("rounds", []) if "elapsed_s" in r]
            # Written right after the last round's elapsed_s was taken (the final rewrite is not).
            if data.get("status") == "running" and timed and self.results.stat().st_mtime == mtime:
                self.recorder_t0 = mtime - timed[-1]["elapsed_s"]


# --------------------------------------------------------------------------- the bench


def round_times(results: Mapping[str, Any]) -> list[float]:
    """Seconds of each round from ``results.json``'s cumulative ``elapsed_s``."""
    elapsed = [r["elapsed_s"] for r in results["rounds"]]
    return [round(b - a, 3) for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)]


def _git(app: Path) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(app), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("flwr", "torch", "timm", "ray"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def round_bench(
    run_config: Mapping[str, Any],
    *,
    app_dir: str | Path = REPO,
    skip_floor: bool = False,
    skip_bound: bool = False,
    supernodes: int | None = None,
    timeout_s: float = 3600.0,
    bound_measure_s: float = 8.0,
    floor_rounds_: int | None = None,
    scaling: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure one setting (see the module doc); the report as a JSON-ready dict.

    Bad input raises :class:`ConfigError` before anything starts; a run that does not complete
    raises :class:`fedvit.runner.RunnerError`.
    """
    import torch

    from fedvit.data import cache_path, partition_fingerprint
    from fedvit.models import build_model
    from fedvit.params import ParameterSplit
    from fedvit.runner import (
        RunnerError,
        describe,
        is_fedvit_app,
        prepare_run_config,
        run_flwr,
        simulation_workers,
    )

    say = progress or (lambda _msg: None)
    app = Path(app_dir).expanduser().resolve()
    from fedvit.runner import app_project

    if not is_fedvit_app(app_project(app)):
        raise ConfigError(f"bench round: {app} is not a fedvit app (its ServerApp is not fedvit's)")
    given = dict(run_config)
    prepared = prepare_run_config(app, given)  # unknown keys, bad values: ConfigError now
    cfg: FedvitConfig = prepared.cfg
    if cfg.server.num_rounds < 2:
        raise ConfigError(
            f"bench round: num-server-rounds must be >= 2 (steady round = median of rounds >= 2), "
            f"got {cfg.server.num_rounds}"
        )
    if cfg.server.resume:
        raise ConfigError("bench round: 'resume' is not supported (it measures a fresh run)")
    if not skip_bound and cfg.model.arch != "vit":
        raise ConfigError(
            f"bench round: the compute bound needs an image model (model.arch={cfg.model.arch})"
        )
    n = cfg.clients.num_clients
    cores = len(os.sched_getaffinity(0))
    model = build_model(cfg)
    split = ParameterSplit.from_model(model, cfg.method.private)
    sd = model.state_dict()
    payload = int(sum(sd[k].numel() for k in split.shared))
    del model, sd
    cache_warm = cache_path(cfg, partition_fingerprint(cfg)).is_file()

    with contextlib.ExitStack() as stack:
        rc = dict(given)
        if not rc.get("output-dir"):  # a throwaway run directory and client state
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedvit-bench-")))
            rc["output-dir"] = str(tmp / "out")
            rc["run-name"] = "bench-round"
            if "clients.state_dir" not in str(rc.get("overrides", "")):
                rc["overrides"] = f"{rc.get('overrides', '')} clients.state_dir={tmp / 'state'}".strip()
        trace_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedvit-trace-")))
        prepared = prepare_run_config(app, rc)
        # the run directory this bench reads must be the one the run writes: pin the chosen name
        # (left to the runner, a timestamped default could fall on the next second)
        rc = {**rc, "run-name": prepared.run_config.get("run-name", rc.get("run-name"))}
        assert prepared.output_dir is not None
        results_path = prepared.output_dir / "results.json"
        load_before = os.getloadavg()
        say(f"bench round: running the federation ({n} clients, {cfg.server.num_rounds} rounds) ...")
        t_call = time.time()
        with RunWatcher(results_path) as watcher:
            outcome = run_flwr(
                app,
                rc,
                num_supernodes=supernodes,
                cpus_per_client=1,
                gpus_per_client=0.0,
                timeout_s=timeout_s,
                stream=False,
                progress=say,
                env_extra={TRACE_ENV: str(trace_dir)},
            )
        wall = time.time() - t_call
        records = read_traces(trace_dir)
        if not outcome.ok:
            raise RunnerError(
                f"bench round: the federation did not complete\n{describe(outcome, log_lines=15)}"
            )
        results = json.loads(results_path.read_text())
        kept_run_dir = str(prepared.output_dir) if given.get("output-dir") else None

    times = round_times(results)
    steady = _median(times[1:])
    first_elapsed = results["rounds"][0]["elapsed_s"]
    if watcher.recorder_t0 is not None:
        rec_t0, startup_source = watcher.recorder_t0, "results.json mtime - elapsed_s (sub-second)"
    else:  # the run was over before a sample saw it running: started_at has 1 s resolution
        rec_t0 = datetime.fromisoformat(results["started_at"]).timestamp() + 0.5
        startup_source = "results.json started_at + 0.5 s (+-0.5 s)"
    startup = rec_t0 + first_elapsed - t_call

    # messages and images per round (observed client lists; expected = share of all N clients)
    steady_rounds = results["rounds"][1:]
    train_msgs = _median([len(r.get("train", {}).get("clients", [])) for r in steady_rounds])
    eval_msgs = _median(
        [
            len(r.get("eval", {}).get("per_client", {})) + len(r.get("eval", {}).get("failures", []))
            for r in steady_rounds
        ]
    )
    messages = train_msgs + eval_msgs
    report: dict[str, Any] = {
        "bench": "round",
        "date": datetime.now().isoformat(timespec="seconds"),
        "setting": {
            "run_config": given,
            "app": str(app),
            "N": n,
            "supernodes": supernodes or simulation_workers(n, 1),  # simulated SuperNodes of the run
            "rounds": len(times),
            "train_messages_per_round": train_msgs,
            "eval_messages_per_round": eval_msgs,
            "messages_per_round": messages,
            "payload_floats": payload,
            "method": cfg.method.name,
            "dataset": cfg.data.name,
            "model": {
                "name": cfg.model.name,
                "patch_size": cfg.model.patch_size,
                "img_size": cfg.model.img_size,
            },
            "train": {
                "optimizer": cfg.train.optimizer,
                "batch_size": cfg.train.batch_size,
                "local_epochs": cfg.train.local_epochs,
                "local_steps": cfg.train.local_steps,
            },
            "partition_cache_warm_before_run": cache_warm,
        },
        "round_times_s": times,
        "steady_round_s": _r(steady),
        "startup_to_first_round_s": _r(startup),
        "startup": {
            "serverapp_recorder_start_s": _r(rec_t0 - t_call),
            "first_round_s": _r(first_elapsed),
            "source": startup_source,
        },
        "wall_s": _r(wall),
        "fixed_cost_s": _r(wall - len(times) * steady),
        "peak_rss_mb": _r(watcher.peak_rss / 2**20, 1),
        "memory_sampling": {
            "how": f"/proc/<pid>/statm RSS summed over the run's processes every {SAMPLE_S} s "
            "(pages shared by processes count once per process)",
            "samples": watcher.samples,
            "peak_processes": watcher.peak_procs,
        },
        "run": {"status": outcome.status, "run_id": outcome.run_id, "run_dir": kept_run_dir},
        "app_commit": _git(app),
        **dict.fromkeys(
            (
                "bound_s",
                "floor_ms_per_message",
                "floor_s_per_round",
                "ratio_round_over_bound",
                "ratio_round_over_floor_plus_bound",
                "overhead_ms_per_message_above_floor",
            )
        ),
    }

    bound = None
    if not skip_bound:
        say(f"bench round: timing the model (2 x {bound_measure_s:g} s, 1 thread) ...")
        costs = step_costs(cfg, seconds=bound_measure_s)
        sizes = client_sizes(cfg)
        all_train = sum(s["train"] for s in sizes)
        all_eval = sum(s["eval"] for s in sizes)
        img_train, img_eval = train_msgs / n * all_train, eval_msgs / n * all_eval
        t_tr, t_ev = costs["train_s_per_image"], costs["eval_s_per_image"]
        bound = bound_seconds(img_train, img_eval, t_tr, t_ev, cores)
        per_round = []
        for r in results["rounds"]:
            tr = sum(sizes[c]["train"] for c in r.get("train", {}).get("clients", []))
            ev = sum(sizes[int(c)]["eval"] for c in r.get("eval", {}).get("per_client", {}))
            per_round.append(round(bound_seconds(tr, ev, t_tr, t_ev, cores), 3))
        report["bound_s"] = _r(bound)
        report["bound"] = {
            "train_ms_per_image": _r(t_tr * 1e3, 4),
            "eval_ms_per_image": _r(t_ev * 1e3, 4),
            "images_trained_per_round": _r(img_train, 1),
            "images_evaluated_per_round": _r(img_eval, 1),
            "cores": cores,
            "per_round_s": per_round,
            **{k: costs[k] for k in ("batch_size", "torch_threads", "seconds_per_measure", "model_params")},
        }
        report["ratio_round_over_bound"] = _r(steady / bound)
        if scaling:
            say(f"bench round: the same steps in {cores} processes at once ...")
            conc = concurrent_step_costs(cfg, cores, seconds=bound_measure_s)
            c_tr, c_ev = conc["train_s_per_image"], conc["eval_s_per_image"]
            report["bound"]["all_cores_busy"] = {
                "processes": cores,
                "train_ms_per_image": _r(c_tr * 1e3, 4),
                "eval_ms_per_image": _r(c_ev * 1e3, 4),
                "train_slowdown": _r(c_tr / t_tr),
                "eval_slowdown": _r(c_ev / t_ev),
                "bound_s": _r(bound_seconds(img_train, img_eval, c_tr, c_ev, cores)),
            }
    slots = min(cores, supernodes or simulation_workers(n, 1))
    ends = [rec_t0 + r["elapsed_s"] for r in results["rounds"]]
    usage = worker_usage(
        records,
        list(zip([rec_t0, *ends[:-1]], ends, strict=True)),
        slots,
        report["bound"]["per_round_s"] if bound is not None else None,
    )
    numeric = [k for k in usage[0] if k != "messages"] if usage else []
    report["workers"] = {
        "slots": slots,
        "how": "each ClientApp message's wall and CPU time (fedvit.worker.traced) inside each round's "
        "window; round - bound = above_bound_work_s + waiting_in_message_s + idle_per_slot_s",
        "steady": {k: _r(_median([u[k] for u in usage[1:] if u[k] is not None])) for k in numeric},
        "per_round": usage,
        "first_message_after_call_s": _r(min(r["t0"] for r in records) - t_call) if records else None,
        "discovery_messages": sum(r["kind"] in ("query", "describe") for r in records),
    }
    floor_ms = None
    if not skip_floor:
        say(f"bench round: Flower's floor ({n} no-op nodes, {payload} floats) ...")
        floor = flower_floor(n, payload, cores, rounds=floor_rounds_, timeout_s=timeout_s)
        floor_ms = floor["floor_ms_per_message"]
        report["floor_ms_per_message"] = _r(floor_ms)
        report["floor_s_per_round"] = _r(floor_ms * messages / 1000.0)
        report["floor"] = floor
    if bound is not None and floor_ms is not None:
        report["ratio_round_over_floor_plus_bound"] = _r(steady / (floor_ms * messages / 1000.0 + bound))
        report["overhead_ms_per_message_above_floor"] = _r((steady - bound) / messages * 1000.0 - floor_ms)
    report["machine"] = {
        "cores": cores,
        "cpu_count": os.cpu_count(),
        "torch_threads_bound": 1,
        "torch_threads_default": torch.get_num_threads(),
        "client_resources_num_cpus": 1,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        **_versions(),
    }
    return report


if __name__ == "__main__":
    # children: python -m fedvit.bench_round --floor N FLOATS ROUNDS CPUS | --costs CFG.pkl SECONDS
    if len(sys.argv) == 6 and sys.argv[1] == "--floor":
        result = floor_child(*(int(a) for a in sys.argv[2:6]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--costs":
        import pickle

        result = step_costs(pickle.loads(Path(sys.argv[2]).read_bytes()), seconds=float(sys.argv[3]))
    else:
        sys.exit("usage: python -m fedvit.bench_round --floor N FLOATS ROUNDS CPUS | --costs CFG.pkl SECONDS")
    print(json.dumps(result), flush=True)
