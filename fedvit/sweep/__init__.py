"""Sweeps: run-config values × seeds, one run directory each (``fedvit sweep``).

A sweep spec (a YAML file, or the same from the command line)::

    base:                     # run-config values every run starts from
      dataset: digits
      num-server-rounds: 20
      overrides: "model.depth=2"
    grid:                     # key: [values]; every combination is run
      method: [fedavg, fedper]
      train.lr: [0.001, 0.01] # dotted config keys go through `overrides`
    runs:                     # optional: explicit named combinations (crossed with the grid)
      - name: attn-private
        values: {method: fedavg, method.private: [attn]}
    seeds: [0, 1, 2]          # optional: each combination once per seed
    engine: inprocess         # simulation (flwr run, Ray; default) | inprocess
    out: outputs/my-sweep     # the sweep directory

Each run writes its normal run directory ``<out>/<name>/``; the name comes from the run's own
values (see :func:`run_name`), so the same values always give the same directory. A run whose
``results.json`` says ``completed`` is skipped; one with a checkpoint is continued from it
(``resume``); anything else left in its directory is removed and the run starts over. A failed
run does not stop the sweep. ``sweep.json`` (the manifest) is rewritten atomically after every
run, and at the end ``sweep.md`` / ``sweep.csv`` hold one row per combination of non-seed values:
mean ± std over seeds of the clients' mean test accuracy (last round and best-validation
round), the mean over seeds of the std over clients, and how many seeds are done.

The package, one concern a module: :mod:`~fedvit.sweep.spec` (the spec and its checks),
:mod:`~fedvit.sweep.plan` (runs, names, run configs), :mod:`~fedvit.sweep.engines` (running one
federation; what a run directory holds), :mod:`~fedvit.sweep.table` (the manifest and the table);
:mod:`~fedvit.sweep.parallel` (runs at once, each in its own process); :func:`run_sweep`, here,
runs them in order, or up to ``jobs`` at once. Everything is importable from ``fedvit.sweep``.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedvit import io
from fedvit.config import CONF_DIR, FedvitConfig, load_config
from fedvit.launch.signals import signals_raise
from fedvit.sweep import parallel
from fedvit.sweep.engines import (
    RunFn,
    checkpoint_round,
    config_diff,
    make_simulation_runner,
    run_inprocess,
    run_status,
)
from fedvit.sweep.plan import MAX_NAME, SweepRun, check, plan, run_config, run_name, short_keys
from fedvit.sweep.spec import (
    ENGINES,
    RESERVED,
    SPEC_KEYS,
    NamedRun,
    SweepSpec,
    check_jobs,
    load_spec,
    out_dir_of,
    parse_grid_arg,
    parse_value,
    spec_from_args,
    spec_from_mapping,
)
from fedvit.sweep.table import (
    MANIFEST,
    SCHEMA,
    TABLE_CSV,
    TABLE_MD,
    display_value,
    document,
    manifest_entry,
    old_entries,
    report_sweep,
    table_markdown,
    table_rows,
    write_manifest,
)

__all__ = [
    "ENGINES",
    "MANIFEST",
    "MAX_NAME",
    "RESERVED",
    "SCHEMA",
    "SPEC_KEYS",
    "TABLE_CSV",
    "TABLE_MD",
    "NamedRun",
    "RunFn",
    "SweepOutcome",
    "SweepRun",
    "SweepSpec",
    "check",
    "check_jobs",
    "display_value",
    "load_spec",
    "make_simulation_runner",
    "out_dir_of",
    "parse_grid_arg",
    "parse_value",
    "plan",
    "report_sweep",
    "run_config",
    "run_inprocess",
    "run_name",
    "run_status",
    "run_sweep",
    "short_keys",
    "spec_from_args",
    "spec_from_mapping",
    "table_markdown",
    "table_rows",
]


@dataclass
class SweepOutcome:
    out_dir: Path
    runs: list[SweepRun]
    rows: list[dict[str, Any]]
    markdown: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def run_sweep(
    spec: SweepSpec,
    *,
    only: Collection[str] | None = None,
    run_fn: RunFn | None = None,
    app_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
    jobs: int | None = None,
) -> SweepOutcome:
    """Run ``spec``'s runs (``only``: just these run names; the others are left as they are) and
    write ``sweep.json`` after every run starts and ends, and ``sweep.md`` / ``sweep.csv`` at the
    end. Every run's config is checked before anything runs (:class:`ConfigError`); failed runs
    are listed in the outcome, the others still run. ``jobs`` (default: the spec's): runs at once,
    each in its own process (:mod:`fedvit.sweep.parallel`; ``run_fn`` must then be picklable)."""
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out_dir = out_dir_of(spec)
    runs = plan(spec)
    jobs = spec.jobs if jobs is None else check_jobs(jobs, spec.engine)
    prepared = check(spec, only)
    if run_fn is None:
        run_fn = (
            run_inprocess
            if spec.engine == "inprocess"
            else make_simulation_runner(app_dir or CONF_DIR.parent)
        )
    if jobs > 1:
        parallel.check_picklable(run_fn)
    out_dir.mkdir(parents=True, exist_ok=True)
    old = old_entries(out_dir)
    entries = {r.name: manifest_entry(r, out_dir, old.get(r.name)) for r in runs}
    outcome = SweepOutcome(out_dir, runs, [], "")
    todo = [r for r in runs if r.name in prepared]
    write = lambda: write_manifest(out_dir, spec, runs, entries)  # noqa: E731
    write()

    def begin(tag: str, r: SweepRun, where: str = "") -> tuple[dict[str, Any], FedvitConfig] | None:
        """Skip ``r`` (None), or get it ready (resume, or start over) and mark it running: its
        run config and config."""
        rc, cfg = prepared[r.name]
        run_dir = out_dir / r.name
        entry = entries[r.name]
        if run_status(run_dir) == "completed":
            diff = config_diff(run_dir, cfg)
            note = (
                f" (its config differs in {', '.join(diff)}; delete {run_dir} to run it again)"
                if diff
                else ""
            )
            say(f"{tag}: completed, skipped{note}")
            entry["action"] = "skipped"
            outcome.skipped.append(r.name)
            write()
            return None
        after = checkpoint_round(run_dir)
        if after is not None:
            rc = {**rc, "resume": str(run_dir)}
            cfg = load_config(rc)
            say(f"{tag}: continuing from its checkpoint after round {after}{where}")
        else:
            if run_dir.exists():  # started but never checkpointed: start over from nothing
                shutil.rmtree(run_dir)
                say(f"{tag}: no checkpoint; removed what was left and starting over")
            if cfg.clients.state_dir:  # this run's own subdirectory (see run_config)
                shutil.rmtree(Path(cfg.clients.state_dir).expanduser(), ignore_errors=True)
            say(f"{tag}: starting{where}")
        entry.update(
            status="running",
            action="resumed" if after is not None else "fresh",
            resumed_after_round=after,
            message=None,
            wall_s=None,
        )
        write()
        return rc, cfg

    def finish(tag: str, r: SweepRun, ok: bool, msg: str, wall: float) -> None:
        outcome.ran.append(r.name)
        if ok:
            entries[r.name].update(status="completed", wall_s=wall)
            say(f"{tag}: completed in {wall:.0f}s")
        else:
            entries[r.name].update(status="failed", wall_s=wall, message=msg)
            outcome.failed[r.name] = msg
            say(f"{tag}: FAILED: {msg}")
        write()

    if jobs > 1:
        _run_at_once(todo, jobs, run_fn, out_dir, begin, finish, entries, write)
        order = {r.name: i for i, r in enumerate(runs)}
        outcome.ran.sort(key=order.__getitem__)
        outcome.failed = dict(sorted(outcome.failed.items(), key=lambda kv: order[kv[0]]))
    else:
        for i, r in enumerate(todo, 1):
            tag = f"[sweep {i}/{len(todo)}] {r.name}"
            started = begin(tag, r)
            if started is None:
                continue
            rc, cfg = started
            t0 = time.monotonic()
            try:
                ok, msg = run_fn(rc, cfg)
            except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM/SIGHUP in fedvit.runner
                entries[r.name].update(status="interrupted", wall_s=round(time.monotonic() - t0, 1))
                write()
                raise
            except Exception as err:  # the engine's machinery broke for this run: record it, go on
                ok, msg = False, f"{type(err).__name__}: {err}"
            finish(tag, r, ok, msg, round(time.monotonic() - t0, 1))
    outcome.rows = table_rows(out_dir, runs)
    outcome.markdown = table_markdown(outcome.rows, list(spec.grid), labels=bool(spec.runs))
    from fedvit.report import to_csv

    io.write_text(out_dir / TABLE_MD, document(spec, len(runs), outcome.rows, outcome.markdown))
    io.write_text(out_dir / TABLE_CSV, to_csv(outcome.rows))
    return outcome


def _run_at_once(
    todo: list[SweepRun],
    jobs: int,
    run_fn: RunFn,
    out_dir: Path,
    begin: Callable[..., tuple[dict[str, Any], FedvitConfig] | None],
    finish: Callable[[str, SweepRun, bool, str, float], None],
    entries: dict[str, dict[str, Any]],
    write: Callable[[], None],
) -> None:
    """Up to ``jobs`` of ``todo`` at once, each in a child process, in plan order as slots free
    up. Ctrl-C / SIGTERM / SIGHUP (or any error of the parent's): the children are stopped, their
    runs marked ``interrupted``, and the interrupt goes on (``KeyboardInterrupt`` /
    ``SystemExit(128 + signal)``)."""
    queue = list(enumerate(todo, 1))
    running: dict[str, tuple[parallel.Child, str, SweepRun]] = {}
    with signals_raise():
        try:
            while queue or running:
                while queue and len(running) < jobs:
                    i, r = queue.pop(0)
                    tag = f"[sweep {i}/{len(todo)}] {r.name}"
                    log = out_dir / r.name / parallel.RUN_LOG
                    started = begin(tag, r, f" (log: {log})")
                    if started is not None:
                        running[r.name] = (parallel.start(r.name, run_fn, started[0], log), tag, r)
                for child in parallel.ended([c for c, _, _ in running.values()]) if running else []:
                    _, tag, r = running.pop(child.name)
                    ok, msg = child.outcome()
                    finish(tag, r, ok, msg, round(time.monotonic() - child.t0, 1))
        except BaseException:  # Ctrl-C, a signal, or the parent's own failure: no child outlives it
            now = time.monotonic()
            parallel.stop([c for c, _, _ in running.values()])
            for child, _, _ in running.values():
                entries[child.name].update(status="interrupted", wall_s=round(now - child.t0, 1))
            write()
            raise
