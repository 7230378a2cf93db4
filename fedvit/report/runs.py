"""Tables of finished runs: one row per run (:func:`collect`, :func:`to_markdown`, :func:`to_csv`),
one configuration's runs over seeds (:func:`over_seeds`, :func:`seeds_markdown`), and finished
runs grouped by method (:func:`finished_runs`, :func:`methods_over_seeds`); see :mod:`fedvit.report`."""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SELECTIONS = ("last", "best-val")


class ReportError(ValueError):
    """A run directory that cannot be reported."""


def load_run(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise ReportError(f"{run_dir}: no results.json")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from err


def _pct(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return 100.0 * value / base


def collect(run_dirs: list[Path], select: str = "last") -> list[dict[str, Any]]:
    """One row per run (``select``: ``last`` round or the ``best-val`` round)."""
    if select not in SELECTIONS:
        raise ReportError(f"--select must be one of {SELECTIONS}, got '{select}'")
    runs = [load_run(d) for d in run_dirs]
    fedavg = {r["dataset"]: r for r in runs if r.get("method") == "fedavg"}
    rows = []
    for d, r in zip(run_dirs, runs, strict=True):
        picked = r.get("summary", {}).get("last_round" if select == "last" else "best_val_round")
        if picked is None:
            raise ReportError(f"{d}: no evaluated round yet")
        res = r.get("resources", {})
        base = fedavg.get(r["dataset"], {}).get("resources", {})
        acc = picked["test_acc"]
        rows.append(
            {
                "run": r.get("run_name", Path(d).name),
                "method": r.get("method"),
                "dataset": r.get("dataset"),
                "status": r.get("status"),
                "round": picked["round"],
                "clients": acc.get("n"),
                "acc_mean": acc.get("mean"),
                "acc_std": acc.get("std"),
                "acc_weighted": acc.get("weighted_mean"),
                "acc_q10": acc.get("q10"),
                "acc_q90": acc.get("q90"),
                "params_stored": res.get("params_stored_per_client"),
                "params_private": res.get("params_private_per_client"),
                "params_sent_up": res.get("params_sent_up_per_round"),
                "flops": res.get("flops_per_sample"),
                "storage_pct": _pct(
                    res.get("params_stored_per_client"), base.get("params_model", res.get("params_model"))
                ),
                "compute_pct": _pct(res.get("flops_per_sample"), base.get("flops_per_sample")),
                "comm_pct": _pct(res.get("params_sent_up_per_round"), base.get("params_sent_up_per_round")),
            }
        )
    return rows


def fmt_cell(v: Any, spec: str = "") -> str:
    """A table cell: ``format(v, spec)``, or "–" for a missing value."""
    if v is None:
        return "–"
    return format(v, spec) if spec else str(v)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table (accuracy in %, resources absolute and relative to FedAvg)."""
    head = (
        "| method | dataset | round | client acc. % (mean ± std) | weighted % | q10–q90 % "
        "| storage (params, %) | computation (FLOPs, %) | communication (params/round, %) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        acc = f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}" if r["acc_mean"] is not None else "–"
        q = f"{100 * r['acc_q10']:.1f}–{100 * r['acc_q90']:.1f}" if r["acc_q10"] is not None else "–"
        weighted = f"{100 * r['acc_weighted']:.2f}" if r["acc_weighted"] is not None else "–"
        lines.append(
            f"| {r['method']} | {r['dataset']} | {r['round']} | {acc} | {weighted} | {q} "
            f"| {fmt_cell(r['params_stored'], ',')} ({fmt_cell(r['storage_pct'], '.1f')}%) "
            f"| {fmt_cell(r['flops'], ',')} ({fmt_cell(r['compute_pct'], '.1f')}%) "
            f"| {fmt_cell(r['params_sent_up'], ',')} ({fmt_cell(r['comm_pct'], '.1f')}%) |"
        )
    return head + "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(
            {k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()} for row in rows
        )
    return buf.getvalue()


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample std) of ``values``; the std needs two values, the mean one."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def last_round_acc(result: Mapping[str, Any]) -> Mapping[str, Any]:
    """A run's test accuracy over clients at its last evaluated round (``mean``, ``std``, ...;
    empty when none was recorded)."""
    return ((result.get("summary") or {}).get("last_round") or {}).get("test_acc") or {}


def run_seed(result: Mapping[str, Any]) -> Any:
    """The seed a run's resolved config names (``None`` when absent)."""
    return (result.get("config") or {}).get("seed")


def over_seeds(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One configuration's completed runs (one per seed, their ``results.json``) -> mean ± std
    over seeds of the clients' mean test accuracy at the last round (``last_*``) and at the
    best-validation round (``best_*``), and the mean over seeds of the std over clients at the
    last round (``client_std_mean``). Accuracies are fractions."""
    last, best, spread = [], [], []
    for r in results:
        summary = r.get("summary") or {}
        acc = last_round_acc(r)
        if acc.get("mean") is None:
            continue
        last.append(float(acc["mean"]))
        if acc.get("std") is not None:
            spread.append(float(acc["std"]))
        picked = ((summary.get("best_val_round") or {}).get("test_acc") or {}).get("mean")
        if picked is not None:
            best.append(float(picked))
    last_mean, last_std = mean_std(last)
    best_mean, best_std = mean_std(best)
    return {
        "seeds_done": len(last),
        "last_mean": last_mean,
        "last_std": last_std,
        "best_mean": best_mean,
        "best_std": best_std,
        "client_std_mean": mean_std(spread)[0],
    }


def pm(mean: float | None, std: float | None) -> str:
    """``mean ± std`` in % (``mean`` alone without a std; ``–`` without a mean)."""
    if mean is None:
        return "–"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"


def seeds_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows of :func:`over_seeds` (plus ``seeds_total``) as Markdown, led by ``columns``
    ((row key, title) pairs: the values that tell the rows apart)."""
    titles = [t for _, t in columns] + [
        "last round acc. % (mean ± std over seeds)",
        "best-val round acc. %",
        "std over clients %",
        "seeds",
    ]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in rows:
        spread = r.get("client_std_mean")
        cells = [str(r.get(k, "")) for k, _ in columns] + [
            pm(r["last_mean"], r["last_std"]),
            pm(r["best_mean"], r["best_std"]),
            "–" if spread is None else f"{100 * spread:.2f}",
            f"{r['seeds_done']}/{r.get('seeds_total', r['seeds_done'])}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def expand_run_dirs(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """Run directories of ``paths``: a sweep directory (``sweep.json``) stands for its runs that
    have completed (the others are left out and named in the returned notes); any other path is a
    run directory and must hold a completed run (:func:`finished_runs` checks)."""
    dirs: list[Path] = []
    notes: list[str] = []
    for path in paths:
        entries = _manifest_runs(Path(path))
        if entries is None:
            dirs.append(Path(path))
            continue
        names = [name for name, _ in entries]
        done = [n for n in names if _status(Path(path) / n) == "completed"]
        dirs += [Path(path) / n for n in done]
        if len(done) < len(names):
            notes.append(f"{path}: {len(names) - len(done)} of {len(names)} runs not completed, left out")
    return dirs, notes


def _status(run_dir: Path) -> str | None:
    try:
        return load_run(run_dir).get("status")
    except ReportError:
        return None


def _manifest_runs(path: Path) -> list[tuple[str, str]] | None:
    """``(run name, label)`` of every run in the sweep directory ``path``'s ``sweep.json`` (the
    label: the combination's name without the seed, e.g. ``fedavg-last-head``; else the name), or
    ``None`` when ``path`` is not a sweep directory."""
    manifest = path / "sweep.json"
    if not manifest.is_file():
        return None
    try:
        runs = json.loads(manifest.read_text())["runs"]
        return [(str(e["name"]), str(e.get("label") or e["name"])) for e in runs]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ReportError(f"{manifest}: not a readable sweep manifest ({err})") from err


def sweep_labels(paths: Sequence[Path]) -> dict[Path, str]:
    """Each run directory of the sweep directories among ``paths`` and its run's label there."""
    return {Path(p) / name: label for p in paths for name, label in _manifest_runs(Path(p)) or []}


def finished_runs(
    run_dirs: Sequence[Path], labels: Mapping[Path, str] | None = None
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """``results.json`` of completed runs grouped by (method, dataset), one run per seed. A sweep
    that runs one method in several configurations (two runs of a method with the same seed) is
    grouped by the runs' ``labels`` instead (:func:`sweep_labels`), when every run has one. A run
    directory without results, not completed, or two runs of a method with one seed and no labels
    to tell them apart is a :class:`ReportError`."""
    if not run_dirs:
        raise ReportError("no run directories to report")
    runs = []
    for d in run_dirs:
        r = load_run(d)
        if r.get("status") != "completed":
            raise ReportError(f"{d}: the run has not completed (status {r.get('status')!r})")
        if not (r.get("summary") or {}).get("last_round"):
            raise ReportError(f"{d}: no round evaluated on every client")
        runs.append((Path(d), r))
    try:
        return _group(runs, lambda d, r: str(r.get("method")))
    except ReportError:
        if not labels or any(d not in labels for d, _ in runs):
            raise
        return _group(runs, lambda d, r: labels[d])


def _group(runs, name) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    seen: dict[tuple[str, str, Any], Path] = {}
    for d, r in runs:
        key = (name(d, r), str(r.get("dataset")))
        seed = run_seed(r)
        if (*key, seed) in seen:
            raise ReportError(
                f"{d} and {seen[(*key, seed)]}: two runs of {key[0]} on {key[1]} with seed {seed}; "
                "pass one configuration per method"
            )
        seen[(*key, seed)] = d
        groups.setdefault(key, []).append(r)
    return groups


def methods_over_seeds(groups: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One :func:`over_seeds` row per (method, dataset) of :func:`finished_runs`."""
    return [{"method": m, "dataset": ds, **over_seeds(runs)} for (m, ds), runs in groups.items()]
