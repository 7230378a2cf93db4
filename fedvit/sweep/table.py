"""A sweep's table and manifest: ``sweep.json`` (every run's values, status and timing, rewritten
after every run), ``sweep.md`` / ``sweep.csv`` (one row per combination of non-seed values, mean ±
std over its completed seeds), and the same table rebuilt from a sweep directory
(:func:`report_sweep`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fedvit import io
from fedvit.config import ConfigError
from fedvit.sweep.engines import run_status
from fedvit.sweep.plan import SweepRun
from fedvit.sweep.spec import SweepSpec

SCHEMA = "fedvit.sweep/1"
MANIFEST, TABLE_MD, TABLE_CSV = "sweep.json", "sweep.md", "sweep.csv"


def old_entries(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The entries of an earlier ``sweep.json`` by run name (none when there is no readable one)."""
    try:
        old = json.loads((out_dir / MANIFEST).read_text())
        return {e["name"]: e for e in old.get("runs", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def manifest_entry(run: SweepRun, out_dir: Path, old: Mapping[str, Any] | None) -> dict[str, Any]:
    """A run's manifest entry before this invocation touches it (status from its directory)."""
    status = run_status(out_dir / run.name)
    done = status == "completed"
    kept = old if done and old else {}  # what an earlier invocation recorded about this finished run
    return {
        "name": run.name,
        "combo": run.combo,
        "label": run.label,
        "values": run.grid_values,
        "run_values": run.values,
        "seed": run.seed,
        "status": "completed" if done else ("interrupted" if status else "pending"),
        "action": None,
        "wall_s": kept.get("wall_s"),
        "resumed_after_round": kept.get("resumed_after_round"),
        "message": None,
    }


def write_manifest(
    out_dir: Path, spec: SweepSpec, runs: list[SweepRun], entries: Mapping[str, dict[str, Any]]
) -> None:
    """Rewrite ``sweep.json`` (atomically) with ``entries`` in plan order."""
    data = {
        "schema": SCHEMA,
        "updated_at": datetime.now().isoformat(timespec="seconds"),
        "spec": {**spec.to_dict(), "out": str(out_dir)},
        "runs": [entries[r.name] for r in runs],
    }
    io.write_json(out_dir / MANIFEST, data, indent=1, default=str)


def table_rows(out_dir: Path, runs: Sequence[SweepRun]) -> list[dict[str, Any]]:
    """One row per combination of non-seed values (in plan order): its values, then
    :func:`fedvit.report.over_seeds` of its completed runs' results, and the seeds planned."""
    from fedvit.report import ReportError, load_run, over_seeds

    groups: dict[str, list[SweepRun]] = {}
    for r in runs:
        groups.setdefault(r.combo, []).append(r)
    rows = []
    for combo, members in groups.items():
        results = []
        for r in members:
            try:
                data = load_run(out_dir / r.name)
            except ReportError:
                continue
            if data.get("status") == "completed":
                results.append(data)
        first = members[0]
        rows.append(
            {
                "combo": combo,
                **({"run": first.label} if first.label is not None else {}),
                **{k: display_value(v) for k, v in first.grid_values.items()},
                "seeds_total": len(members),
                **over_seeds(results),
            }
        )
    return rows


def display_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(display_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def table_markdown(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], labels: bool) -> str:
    from fedvit.report import seeds_markdown

    columns = ([("run", "run")] if labels else []) + [(k, k) for k in keys]
    return seeds_markdown(rows, columns or [("combo", "run")])


def document(spec: SweepSpec, n_runs: int, rows: Sequence[Mapping[str, Any]], markdown: str) -> str:
    """``sweep.md``: a heading with what ran and how to read the table, then the table."""
    from fedvit.runner import format_run_config

    n_done = sum(r.get("seeds_done", 0) for r in rows)
    head = (
        f"# Sweep: {len(rows)} combination(s) × {len(spec.seeds) if spec.seeds else 1} seed(s), "
        f"{n_done}/{n_runs} runs completed\n\n"
        f"Base run config: `{format_run_config(spec.base) or '(defaults)'}`\n\n"
        "Client top-1 test accuracy in %: the mean over clients (unweighted) at the last round and at "
        "the round with the best mean validation accuracy, each as mean ± std over seeds (sample std; "
        "none with one seed); std over clients: its mean over seeds (last round); seeds: completed / "
        "planned.\n\n"
    )
    return head + markdown


def report_sweep(sweep_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """The table of a sweep directory from its ``sweep.json`` and its runs' ``results.json`` now."""
    path = Path(sweep_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
        spec = data["spec"]
        runs = [
            SweepRun(
                e["name"], e["combo"], e.get("label"), e.get("run_values", {}), e["values"], e.get("seed")
            )
            for e in data["runs"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a readable sweep manifest ({err})") from err
    rows = table_rows(Path(sweep_dir), runs)
    return rows, table_markdown(rows, list(spec.get("grid") or {}), labels=bool(spec.get("runs")))
