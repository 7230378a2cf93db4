"""``fedvit bench round``: a federation's round time against its two yardsticks, as JSON.

One setting (a run config, as for ``fedvit run``) is measured in three steps, one after the other:

1. **The real federation**: :func:`fedvit.runner.run_flwr` (private SuperLink, Ray simulation,
   ``client-resources-num-cpus=1``). Round ``r`` takes ``elapsed_s[r] - elapsed_s[r-1]`` of the
   run's ``results.json`` (``elapsed_s`` counts from the ServerApp's recorder start, so round 1
   also holds discovery); the **steady round** is the median of rounds >= 2 (pipelined evaluation:
   but the last, whose window holds its evaluation alone, :func:`round_windows`). While the run goes,
   a sampler thread reads ``/proc`` every ``SAMPLE_S`` seconds: the summed RSS of every process the
   run started (the descendants of this process and every process tagged with the
   runner's ``FEDVIT_RUNNER_TAG``: SuperLink, SuperExec, ServerApp, Ray, its workers, the ``flwr``
   CLI). ``results.json``'s ``started_at`` (the recorder's start, to the millisecond) places the
   rounds on the same clock as the call to ``run_flwr`` and the workers' message records.
2. **The pure-compute bound**: the config's model, torch threads = 1, random inputs of the
   config's shape, batch = ``train.batch_size``, the config's optimizer (and gradient clipping)
   from :mod:`fedvit.training`: seconds per image of a train step and of an eval forward, timed as
   ``tools/round_bound.py`` does, alternated ``bound_repeats`` times (each kind keeps its fastest:
   a bound, and the least disturbed measurement). bound = (images trained x t_train + images
   evaluated x t_eval) / cores, per round window with the images of the clients that window really trained and
   evaluated (``bound.per_round_s``). ``bound_s`` is the mean over the steady windows, and
   ``ratio_round_over_bound`` their mean time over it: the bound of the same work. (The bound of
   an average window, (messages / N) x the images of all N clients, is ``bound.expected_share_s``:
   with a seeded sample of clients larger or smaller than average it misstates the work done.)
3. **Flower's floor**: a no-op ClientApp in the same Ray simulation engine (``run_simulation``),
   N nodes, one ``evaluate`` message per node per round carrying the shared split's float count,
   in a subprocess (``python -m fedvit.bench_round --floor ...``), as ``tools/flower_floor.py``.

One module a concern: :mod:`~fedvit.bench_round.watch` (step 1's sampling and the workers' time),
:mod:`~fedvit.bench_round.compute` (step 2), :mod:`~fedvit.bench_round.floor` (step 3);
:func:`round_bench`, here, runs the three and writes the report. Everything is importable from
``fedvit.bench_round``; ``python -m fedvit.bench_round`` runs the children of steps 2 and 3.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fedvit.bench_round.compute import (
    bound_seconds,
    client_sizes,
    concurrent_step_costs,
    images_per_client_round,
    step_costs,
)
from fedvit.bench_round.floor import FLOOR_MESSAGES, floor_child, floor_rounds, flower_floor
from fedvit.bench_round.watch import SAMPLE_S, RunWatcher, read_traces, rounded, worker_usage
from fedvit.config import ConfigError, FedvitConfig
from fedvit.worker import TRACE_ENV

REPO = Path(__file__).resolve().parents[2]

__all__ = [
    "FLOOR_MESSAGES",
    "REPO",
    "SAMPLE_S",
    "RunWatcher",
    "bound_seconds",
    "client_sizes",
    "concurrent_step_costs",
    "floor_child",
    "floor_rounds",
    "flower_floor",
    "images_per_client_round",
    "pipelined",
    "read_traces",
    "round_bench",
    "round_times",
    "round_windows",
    "steady_rounds",
    "step_costs",
    "worker_usage",
]


def round_times(results: Mapping[str, Any]) -> list[float]:
    """Seconds of each round from ``results.json``'s cumulative ``elapsed_s``."""
    elapsed = [r["elapsed_s"] for r in results["rounds"]]
    return [round(b - a, 3) for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)]


def pipelined(results: Mapping[str, Any]) -> bool:
    """Whether the run sent each round's evaluation with the next round's training."""
    return bool(results.get("config", {}).get("server", {}).get("pipeline_evaluation", False))


def round_windows(results: Mapping[str, Any]) -> list[tuple[list[int], list[int]]]:
    """The clients trained and evaluated inside each round's window (from the round before
    closing to this one closing). Unpipelined: the round's own. Pipelined, round r's window holds
    round r+1's training with round r's evaluation (round 1's also round 1's training, the last
    round's its evaluation alone)."""
    trained = [list(r.get("train", {}).get("clients", [])) for r in results["rounds"]]
    evaluated = [[int(c) for c in r.get("eval", {}).get("per_client", {})] for r in results["rounds"]]
    if not pipelined(results):
        return list(zip(trained, evaluated, strict=True))
    shifted = [*trained[1:], []]
    shifted[0] = trained[0] + shifted[0]
    return list(zip(shifted, evaluated, strict=True))


def steady_rounds(results: Mapping[str, Any]) -> slice:
    """The rounds whose window holds one round's work (one training, one evaluation): rounds >= 2,
    and with pipelined evaluation not the last (:func:`round_windows`)."""
    n = len(results["rounds"])
    return slice(1, n - 1 if pipelined(results) else n)


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


def round_bench(
    run_config: Mapping[str, Any],
    *,
    app_dir: str | Path = REPO,
    skip_floor: bool = False,
    skip_bound: bool = False,
    supernodes: int | None = None,
    timeout_s: float = 3600.0,
    bound_measure_s: float = 8.0,
    bound_repeats: int = 3,
    floor_rounds_: int | None = None,
    scaling: bool = True,
    private_ray_head: bool = True,
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
    least = 3 if cfg.server.pipeline_evaluation else 2
    if cfg.server.num_rounds < least:
        raise ConfigError(
            f"bench round: num-server-rounds must be >= {least} (steady round = median of rounds >= 2"
            + (", but the last: pipelined evaluation" if least == 3 else "")
            + f"), got {cfg.server.num_rounds}"
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
        with RunWatcher() as watcher:
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
                private_ray_head=private_ray_head,
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
    steady_of = steady_rounds(results)
    steady = _median(times[steady_of])
    first_elapsed = results["rounds"][0]["elapsed_s"]
    # the recorder's start on this machine's clock (results.json's started_at, to the millisecond)
    rec_t0 = datetime.fromisoformat(results["started_at"]).timestamp()
    startup = rec_t0 + first_elapsed - t_call

    # messages and images per round (observed client lists; expected = share of all N clients)
    windows = round_windows(results)[steady_of]
    train_msgs = _median([len(tr) for tr, _ in windows])
    eval_msgs = _median(
        [
            len(r.get("eval", {}).get("per_client", {})) + len(r.get("eval", {}).get("failures", []))
            for r in results["rounds"][steady_of]
        ]
    )
    if pipelined(results):  # a message that carries a training and an evaluation counts once
        messages = _median([len(set(tr) | set(ev)) for tr, ev in windows])
    else:
        messages = train_msgs + eval_msgs
    report: dict[str, Any] = {
        "bench": "round",
        "date": datetime.now().isoformat(timespec="seconds"),
        "setting": {
            "run_config": given,
            "app": str(app),
            "N": n,
            "supernodes": supernodes or simulation_workers(n, 1),  # simulated SuperNodes of the run
            "private_ray_head": private_ray_head,
            "rounds": len(times),
            "pipelined_evaluation": pipelined(results),
            "steady_rounds": [r["round"] for r in results["rounds"][steady_of]],
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
        "steady_round_s": rounded(steady),
        "startup_to_first_round_s": rounded(startup),
        "startup": {
            "serverapp_recorder_start_s": rounded(rec_t0 - t_call),
            "first_round_s": rounded(first_elapsed),
        },
        "wall_s": rounded(wall),
        "fixed_cost_s": rounded(wall - len(times) * steady),
        "peak_rss_mb": rounded(watcher.peak_rss / 2**20, 1),
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

    bound = steady_mean = None
    if not skip_bound:
        say(f"bench round: timing the model ({bound_repeats} x 2 x {bound_measure_s:g} s, 1 thread) ...")
        costs = step_costs(cfg, seconds=bound_measure_s, repeats=bound_repeats)
        sizes = client_sizes(cfg)
        all_train = sum(s["train"] for s in sizes)
        all_eval = sum(s["eval"] for s in sizes)
        img_train, img_eval = train_msgs / n * all_train, eval_msgs / n * all_eval
        t_tr, t_ev = costs["train_s_per_image"], costs["eval_s_per_image"]
        per_round = []
        for trained, evaluated in round_windows(results):
            tr = sum(sizes[c]["train"] for c in trained)
            ev = sum(sizes[c]["eval"] for c in evaluated)
            per_round.append(round(bound_seconds(tr, ev, t_tr, t_ev, cores), 3))
        # the bound of the same work: the clients the steady windows really trained and evaluated
        bound = statistics.fmean(per_round[steady_of])
        steady_mean = statistics.fmean(times[steady_of])
        report["bound_s"] = rounded(bound)
        report["bound"] = {
            "train_ms_per_image": rounded(t_tr * 1e3, 4),
            "eval_ms_per_image": rounded(t_ev * 1e3, 4),
            "images_trained_per_round": rounded(img_train, 1),
            "images_evaluated_per_round": rounded(img_eval, 1),
            "cores": cores,
            "per_round_s": per_round,
            "steady_mean_round_s": rounded(steady_mean),
            "expected_share_s": rounded(bound_seconds(img_train, img_eval, t_tr, t_ev, cores)),
            "train_ms_per_image_samples": [rounded(t * 1e3, 4) for t in costs["train_s_per_image_samples"]],
            "eval_ms_per_image_samples": [rounded(t * 1e3, 4) for t in costs["eval_s_per_image_samples"]],
            **{
                k: costs[k]
                for k in ("batch_size", "torch_threads", "seconds_per_measure", "repeats", "model_params")
            },
        }
        report["ratio_round_over_bound"] = rounded(steady_mean / bound)
        if scaling:
            say(f"bench round: the same steps in {cores} processes at once ...")
            conc = concurrent_step_costs(cfg, cores, seconds=bound_measure_s)
            c_tr, c_ev = conc["train_s_per_image"], conc["eval_s_per_image"]
            report["bound"]["all_cores_busy"] = {
                "processes": cores,
                "train_ms_per_image": rounded(c_tr * 1e3, 4),
                "eval_ms_per_image": rounded(c_ev * 1e3, 4),
                "train_slowdown": rounded(c_tr / t_tr),
                "eval_slowdown": rounded(c_ev / t_ev),
                "bound_s": rounded(bound_seconds(img_train, img_eval, c_tr, c_ev, cores)),
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
        "steady": {
            k: rounded(_median([u[k] for u in usage[steady_of] if u[k] is not None])) for k in numeric
        },
        "per_round": usage,
        "first_message_after_call_s": rounded(min(r["t0"] for r in records) - t_call) if records else None,
        "discovery_messages": sum(r["kind"] in ("query", "describe") for r in records),
    }
    floor_ms = None
    if not skip_floor:
        say(f"bench round: Flower's floor ({n} no-op nodes, {payload} floats) ...")
        floor = flower_floor(n, payload, cores, rounds=floor_rounds_, timeout_s=timeout_s)
        floor_ms = floor["floor_ms_per_message"]
        report["floor_ms_per_message"] = rounded(floor_ms)
        report["floor_s_per_round"] = rounded(floor_ms * messages / 1000.0)
        report["floor"] = floor
    if bound is not None and floor_ms is not None:
        floor_s = floor_ms * messages / 1000.0
        report["ratio_round_over_floor_plus_bound"] = rounded(steady_mean / (floor_s + bound))
        overhead_ms = (steady_mean - bound) / messages * 1000.0 - floor_ms
        report["overhead_ms_per_message_above_floor"] = rounded(overhead_ms)
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
