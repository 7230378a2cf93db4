"""The "where to personalize" study (FedPerfix, Table 1): ``fedvit study where-to-personalize``.

With one base configuration, one federation per choice of private parameters: for each layer
type (patch embedding, position embedding, LayerNorm, self-attention, MLP, head) that type
private alone ("stand-alone") and together with the head ("combined"; for the head itself the
two are the same run), plus everything private ("all-local") and nothing private
("all-global"). 13 runs, all of them FedAvg's ``partial`` client and ``personalized`` strategy
with ``method.private`` overridden.

Every run writes its normal run directory ``<study dir>/wtp-<layer>-<kind>/``; the study dir
also gets ``study.md`` and ``study.csv``: per layer type the mean ± std over clients of client
top-1 test accuracy at the last round (unweighted), for stand-alone and combined, and
"overall" = the mean of the two means. ``resume`` skips runs whose ``results.json`` says
``completed`` and continues interrupted ones from their checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedvit.config import CONF_DIR, ConfigError, FedvitConfig, load_config

STUDY = "where-to-personalize"
#: The layer types of the study, in table order (group names of fedvit.params).
LAYERS = ("patch_embed", "pos_embed", "norm", "attn", "mlp", "head")
LAYER_TITLES = {
    "patch_embed": "patch embedding",
    "pos_embed": "position embedding",
    "norm": "LayerNorm",
    "attn": "self-attention",
    "mlp": "MLP",
    "head": "head",
}
STANDALONE, COMBINED, ALL_LOCAL, ALL_GLOBAL = "stand-alone", "combined", "all-local", "all-global"
PREFIX = "wtp"
ENGINES = ("simulation", "inprocess")


@dataclass(frozen=True)
class StudyRun:
    """One federation of the study."""

    layer: str  # a LAYERS entry, or "all" for all-local / all-global
    kind: str  # STANDALONE | COMBINED | ALL_LOCAL | ALL_GLOBAL
    private: tuple[str, ...]  # method.private
    #: For the head, the combined configuration *is* the stand-alone one (run once).
    also_combined: bool = False

    @property
    def name(self) -> str:
        """The run name (= the label in :func:`study_table`'s input)."""
        if self.kind in (ALL_LOCAL, ALL_GLOBAL):
            return f"{PREFIX}-{self.kind}"
        return f"{PREFIX}-{self.layer}-{self.kind}"


def plan(only: Sequence[str] | None = None) -> list[StudyRun]:
    """The distinct runs of the study (13), optionally only those of the layer types ``only``
    (``all-local`` / ``all-global`` also select those two runs)."""
    runs: list[StudyRun] = []
    for layer in LAYERS:
        if layer == "head":
            runs.append(StudyRun(layer, STANDALONE, ("head",), also_combined=True))
        else:
            runs.append(StudyRun(layer, STANDALONE, (layer,)))
            runs.append(StudyRun(layer, COMBINED, (layer, "head")))
    runs.append(StudyRun("all", ALL_LOCAL, ("all",)))
    runs.append(StudyRun("all", ALL_GLOBAL, ()))
    if not only:
        return runs
    unknown = sorted(set(only) - {*LAYERS, ALL_LOCAL, ALL_GLOBAL})
    if unknown:
        raise ConfigError(
            f"--only: unknown layer type(s) {unknown}; known: {[*LAYERS, ALL_LOCAL, ALL_GLOBAL]}"
        )
    return [r for r in runs if r.layer in only or r.kind in only]


# --------------------------------------------------------------------------- run configs


def run_config_for(
    base: Mapping[str, Any], run: StudyRun, output_dir: Path, state_dir: str | None = None
) -> dict[str, Any]:
    """The run config of ``run``: the base config, FedAvg's client/strategy, the run's private
    groups, its run name, and the study directory as output directory. ``state_dir``: the base
    config's ``clients.state_dir``, if any; each run gets its own subdirectory of it (the runs
    share method name, model and dataset, so their private states would collide)."""
    rc = dict(base)
    for key in ("method", "run-name", "output-dir", "resume"):
        rc.pop(key, None)
    private = "[" + ",".join(run.private) + "]"
    extra = f"method.private={private} method.strategy=personalized method.client=partial"
    if state_dir:
        extra += f" clients.state_dir={Path(state_dir) / run.name}"
    rc["overrides"] = f"{base.get('overrides', '') or ''} {extra}".strip()
    rc["method"] = "fedavg"
    rc["run-name"] = run.name
    rc["output-dir"] = str(output_dir)
    return rc


def run_status(run_dir: Path) -> str | None:
    """``status`` of ``run_dir/results.json`` (None: no readable results)."""
    try:
        return json.loads((Path(run_dir) / "results.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- the table


def _acc(result: Mapping[str, Any] | None) -> tuple[float, float] | None:
    """(mean, std) over clients of the last round's test accuracy of a completed run."""
    if not result or result.get("status") != "completed":
        return None
    acc = (result.get("summary") or {}).get("last_round", {}).get("test_acc", {})
    mean, std = acc.get("mean"), acc.get("std")
    if mean is None:
        return None
    return float(mean), float(std if std is not None else math.nan)


def study_table(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the study table from ``{run name: results.json}`` (see :func:`plan` for names).

    One row per layer type (stand-alone mean/std, combined mean/std, overall = mean of the two
    means; missing or unfinished runs give None), then all-local and all-global (their numbers
    in the stand-alone columns; overall = their mean). Accuracies are fractions.
    """
    by_key = {(r.layer, r.kind): r for r in plan()}
    rows: list[dict[str, Any]] = []
    for layer in LAYERS:
        alone_run = by_key[(layer, STANDALONE)]
        comb_run = alone_run if alone_run.also_combined else by_key[(layer, COMBINED)]
        alone, comb = _acc(results.get(alone_run.name)), _acc(results.get(comb_run.name))
        overall = (alone[0] + comb[0]) / 2 if alone and comb else None
        rows.append(_row(layer, LAYER_TITLES[layer], alone, comb, overall, alone_run.also_combined))
    for kind in (ALL_LOCAL, ALL_GLOBAL):
        acc = _acc(results.get(by_key[("all", kind)].name))
        rows.append(_row(kind, kind, acc, None, acc[0] if acc else None, False))
    return rows


def _row(
    key: str,
    title: str,
    alone: tuple[float, float] | None,
    comb: tuple[float, float] | None,
    overall: float | None,
    same: bool,
) -> dict[str, Any]:
    return {
        "layer": key,
        "title": title,
        "standalone_mean": alone[0] if alone else None,
        "standalone_std": alone[1] if alone else None,
        "combined_mean": comb[0] if comb else None,
        "combined_std": comb[1] if comb else None,
        "combined_is_standalone": same,
        "overall": overall,
    }


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The study table: client top-1 test accuracy in % (mean ± std over clients, last round)."""
    lines = [
        "| private layer type | stand-alone % | combined (+ head) % | overall % |",
        "|---|---|---|---|",
    ]
    for r in rows:
        comb = _pm(r["combined_mean"], r["combined_std"])
        if r["combined_is_standalone"]:
            comb += " (= stand-alone)"
        elif r["layer"] in (ALL_LOCAL, ALL_GLOBAL):
            comb = ""
        overall = "–" if r["overall"] is None else f"{100 * r['overall']:.2f}"
        lines.append(
            f"| {r['title']} | {_pm(r['standalone_mean'], r['standalone_std'])} | {comb} | {overall} |"
        )
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["layer"])
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


# --------------------------------------------------------------------------- running

#: ``(run_config, cfg) -> (ok, message)``: runs one federation.
RunFn = Callable[[dict[str, Any], FedvitConfig], tuple[bool, str]]


def run_inprocess(run_config: dict[str, Any], cfg: FedvitConfig) -> tuple[bool, str]:
    """One federation in this process (InProcessGrid + the ServerApp's ``run``)."""
    from fedvit.inprocess import InProcessGrid
    from fedvit.server_app import run

    try:
        run_dir = run(InProcessGrid(run_config, cfg.clients.num_clients), cfg)
    except Exception as err:  # one failed run does not stop the study
        return False, f"{type(err).__name__}: {err}"
    status = run_status(run_dir)
    return status == "completed", f"status {status}"


def make_simulation_runner(app_dir: Path, quiet: bool = True) -> RunFn:
    """One federation with ``flwr run`` in Flower's Ray simulation (:func:`fedvit.runner.run_flwr`)."""

    def run_one(run_config: dict[str, Any], cfg: FedvitConfig) -> tuple[bool, str]:
        from fedvit.runner import describe, run_flwr

        outcome = run_flwr(app_dir, run_config, gpus_per_client=None, stream=not quiet)
        return outcome.ok, describe(outcome, log_lines=0 if outcome.ok else 10)

    return run_one


@dataclass
class StudyOutcome:
    study_dir: Path
    rows: list[dict[str, Any]]
    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]

    @property
    def ok(self) -> bool:
        return not self.failed


def run_study(
    base_run_config: Mapping[str, Any],
    *,
    output_dir: Path | None = None,
    engine: str = "simulation",
    only: Sequence[str] | None = None,
    resume: bool = False,
    run_fn: RunFn | None = None,
    app_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> StudyOutcome:
    """Run the study's federations (skipping completed ones with ``resume``), then write
    ``study.md`` / ``study.csv`` into the study directory. Config errors raise
    :class:`ConfigError` before anything runs; failed runs are listed in the outcome."""
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {ENGINES}, got '{engine}'")
    base = dict(base_run_config)
    base_cfg = load_config(base)
    study_dir = Path(output_dir if output_dir is not None else Path(base_cfg.output.dir) / STUDY)
    study_dir = study_dir.expanduser().resolve()
    runs = plan(only)
    # Check every configuration before running anything.
    prepared = []
    for r in runs:
        rc = run_config_for(base, r, study_dir, base_cfg.clients.state_dir)
        prepared.append((r, rc, load_config(rc)))
    if not resume:
        existing = [r.name for r in runs if (study_dir / r.name / "results.json").exists()]
        if existing:
            raise ConfigError(
                f"{study_dir} already holds run(s) {existing}; use --resume or another --output-dir"
            )
    if run_fn is None:
        run_fn = (
            run_inprocess if engine == "inprocess" else make_simulation_runner(app_dir or CONF_DIR.parent)
        )
    ran, skipped, failed = [], [], {}
    for i, (r, rc, cfg) in enumerate(prepared, 1):
        run_dir = study_dir / r.name
        status = run_status(run_dir)
        if resume and status == "completed":
            say(f"[study {i}/{len(prepared)}] {r.name}: completed, skipped")
            skipped.append(r.name)
            continue
        if resume and (run_dir / "results.json").exists():
            if (run_dir / "checkpoint" / "state.json").is_file():
                rc = {**rc, "resume": str(run_dir)}
                cfg = load_config(rc)
                say(f"[study {i}/{len(prepared)}] {r.name}: continuing from its checkpoint")
            else:  # it never finished a round: start over, keeping the old directory aside
                aside = run_dir.with_name(f"{r.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(str(run_dir), str(aside))
                say(f"[study {i}/{len(prepared)}] {r.name}: no checkpoint; moved to {aside.name}")
        say(f"[study {i}/{len(prepared)}] {r.name}: private={list(r.private)}")
        t0 = time.monotonic()
        ok, msg = run_fn(rc, cfg)
        ran.append(r.name)
        if ok:
            say(f"[study {i}/{len(prepared)}] {r.name}: completed in {time.monotonic() - t0:.0f}s")
        else:
            failed[r.name] = msg
            say(f"[study {i}/{len(prepared)}] {r.name}: FAILED: {msg}")
    results = {}
    for r in plan():
        path = study_dir / r.name / "results.json"
        if path.is_file():
            try:
                results[r.name] = json.loads(path.read_text())
            except ValueError:
                continue
    rows = study_table(results)
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "study.md").write_text(_document(rows, base_cfg, base))
    (study_dir / "study.csv").write_text(to_csv(rows))
    return StudyOutcome(study_dir, rows, ran, skipped, failed)


def _document(rows: list[dict[str, Any]], cfg: FedvitConfig, base: Mapping[str, Any]) -> str:
    from fedvit.runner import format_run_config

    head = (
        f"# Where to personalize: {cfg.data.name}, {cfg.clients.num_clients} clients, "
        f"{cfg.data.partition.kind} (alpha {cfg.data.partition.alpha}), {cfg.model.name}, "
        f"{cfg.server.num_rounds} rounds\n\n"
        f"Base run config: `{format_run_config(base) or '(defaults)'}`\n\n"
        "Client top-1 test accuracy at the last round, mean ± std over clients (unweighted); "
        "combined = the layer type and the head private; overall = mean of the stand-alone and "
        "combined means. '–': run missing or not completed.\n\n"
    )
    return head + to_markdown(rows)
