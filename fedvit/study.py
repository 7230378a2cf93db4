"""The "where to personalize" study (FedPerfix, Table 1): ``fedvit study where-to-personalize``.

With one base configuration, one federation per choice of private parameters: for each layer
type (patch embedding, position embedding, LayerNorm, self-attention, MLP, head) that type
private alone ("stand-alone") and together with the head ("combined"; for the head itself the
two are the same run), plus everything private ("all-local") and nothing private
("all-global"). 13 runs, all of them FedAvg's ``partial`` client and ``personalized`` strategy
with ``method.private`` overridden.

The study is one use of :mod:`fedvit.sweep`: its 13 runs are the sweep's explicit ``runs``
(names ``wtp-<layer>-<kind>``, no grid, no seeds), so every run writes its normal run directory
``<study dir>/wtp-<layer>-<kind>/`` and the study dir holds the sweep's ``sweep.json`` /
``sweep.md`` / ``sweep.csv``. On top, the study writes ``study.md`` and ``study.csv``: per layer
type the mean ± std over clients of client top-1 test accuracy at the last round (unweighted),
for stand-alone and combined, and "overall" = the mean of the two means. ``resume`` (the
sweep's rules) skips runs whose ``results.json`` says ``completed`` and continues interrupted
ones from their checkpoint; without it, a study directory that already holds runs is refused.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedvit.config import ConfigError, FedvitConfig, load_config
from fedvit.io import write_text
from fedvit.sweep import ENGINES, NamedRun, RunFn, SweepSpec, run_sweep
from fedvit.sweep import run_config as sweep_run_config

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

#: Run-config keys of the base config that the study sets itself.
_STUDY_SET = ("method", "run-name", "output-dir", "resume")


def run_values(run: StudyRun) -> dict[str, Any]:
    """What a study run sets on top of the base config: FedAvg's client and strategy with the
    run's private groups (dotted keys: they go through ``overrides``)."""
    return {
        "method": "fedavg",
        "method.private": list(run.private),
        "method.strategy": "personalized",
        "method.client": "partial",
    }


def run_config_for(
    base: Mapping[str, Any], run: StudyRun, output_dir: Path, state_dir: str | None = None
) -> dict[str, Any]:
    """The run config of ``run``: the base config, FedAvg's client/strategy, the run's private
    groups, its run name, and the study directory as output directory. ``state_dir``: the base
    config's ``clients.state_dir``, if any; each run gets its own subdirectory of it (the runs
    share method name, model and dataset, so their private states would collide)."""
    rest = {k: v for k, v in base.items() if k not in _STUDY_SET}
    return sweep_run_config(rest, run_values(run), name=run.name, out_dir=output_dir, state_dir=state_dir)


def study_spec(base: Mapping[str, Any], study_dir: Path, engine: str) -> SweepSpec:
    """The study as a sweep: its 13 runs, named, over the base config."""
    rest = {k: v for k, v in base.items() if k not in _STUDY_SET}
    runs = [NamedRun(r.name, run_values(r)) for r in plan()]
    return SweepSpec(base=rest, runs=runs, engine=engine, out=str(study_dir))


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
    """Run the study's federations as a sweep (see :func:`fedvit.sweep.run_sweep`; ``only``
    selects layer types), then write ``study.md`` / ``study.csv`` into the study directory.
    Config errors raise :class:`ConfigError` before anything runs; failed runs are listed in the
    outcome. Without ``resume`` a directory that already holds any of the runs is refused."""
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {ENGINES}, got '{engine}'")
    base = dict(base_run_config)
    base_cfg = load_config(base)
    study_dir = Path(output_dir if output_dir is not None else Path(base_cfg.output.dir) / STUDY)
    study_dir = study_dir.expanduser().resolve()
    selected = [r.name for r in plan(only)]
    spec = study_spec(base, study_dir, engine)
    if not resume:
        existing = [n for n in selected if (study_dir / n / "results.json").exists()]
        if existing:
            raise ConfigError(
                f"{study_dir} already holds run(s) {existing}; use --resume or another --output-dir"
            )
    outcome = run_sweep(spec, only=selected, run_fn=run_fn, app_dir=app_dir, progress=say)
    results = {}
    for r in plan():
        path = study_dir / r.name / "results.json"
        if path.is_file():
            try:
                results[r.name] = json.loads(path.read_text())
            except ValueError:
                continue
    rows = study_table(results)
    write_text(study_dir / "study.md", _document(rows, base_cfg, base))  # atomic: a reader never sees half
    write_text(study_dir / "study.csv", to_csv(rows))
    return StudyOutcome(study_dir, rows, outcome.ran, outcome.skipped, outcome.failed)


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
