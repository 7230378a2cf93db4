"""Tables from finished runs: ``fedvit report RUN_DIR...``.

One row per run: client accuracy (mean ± std over clients, unweighted, and the example-weighted
mean) at the chosen round, and the resources, each also relative to FedAvg on the same dataset
(FedAvg's model is the plain model: ``params_model`` and its FLOPs) like the FedPerfix paper's
Table 2: storage (parameters a client holds), computation (forward FLOPs per sample),
communication (parameters sent up per round).

Over seeds (``fedvit sweep``): :func:`over_seeds` turns the results of one configuration's runs
(one per seed) into mean ± std over seeds, :func:`seeds_markdown` prints such rows.

A paper column (``fedvit report --paper NAME``): :func:`load_paper` reads a published table
(``conf/paper/<NAME>.yaml`` or a YAML path), :func:`paper_rows` puts each method's numbers over
seeds beside the paper's, with both rank orders and Kendall's τ (:func:`paper_markdown`).

One concern a module: :mod:`~fedvit.report.runs` (per-run rows, over seeds, runs grouped by
method), :mod:`~fedvit.report.paper` (a paper column); the accuracy-vs-round figure and
``fedvit report --paper/--curves`` (:func:`report_methods`) here. Everything is importable from
``fedvit.report``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedvit.report.paper import (
    PaperMethod,
    PaperTable,
    load_paper,
    paper_column,
    paper_markdown,
    paper_names,
    paper_rows,
    with_rows,
)
from fedvit.report.runs import (
    SELECTIONS,
    ReportError,
    collect,
    expand_run_dirs,
    finished_runs,
    load_run,
    mean_std,
    methods_over_seeds,
    over_seeds,
    pm,
    seeds_markdown,
    sweep_labels,
    to_csv,
    to_markdown,
)

__all__ = [
    "SELECTIONS",
    "PaperMethod",
    "PaperTable",
    "ReportError",
    "collect",
    "expand_run_dirs",
    "finished_runs",
    "load_paper",
    "load_run",
    "mean_std",
    "methods_over_seeds",
    "over_seeds",
    "paper_column",
    "paper_markdown",
    "paper_names",
    "paper_rows",
    "pm",
    "report_methods",
    "seeds_markdown",
    "sweep_labels",
    "to_csv",
    "to_markdown",
    "with_rows",
    "write_curves",
]


def write_curves(groups: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]], out: Path) -> Path:
    """``fedvit report --curves OUT.png``: accuracy vs round of every method of :func:`finished_runs`
    (mean over seeds, min–max band; full-evaluation rounds only, see :func:`fedvit.plots.seed_curve`)."""
    from fedvit.plots import plot_curves, seed_curve

    datasets = sorted({ds for _, ds in groups})
    curves = {
        (m if len(datasets) == 1 else f"{m} ({ds})"): seed_curve(runs) for (m, ds), runs in groups.items()
    }
    return plot_curves(curves, out, title=f"test accuracy per round on {', '.join(datasets)}")


def report_methods(
    paths: Sequence[Path],
    *,
    paper: str | Path | None = None,
    paper_dataset: str | None = None,
    paper_rows_from: Mapping[str, str] | None = None,
    curves: Path | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """``fedvit report --paper/--curves``: the runs of ``paths`` (run or sweep directories) grouped
    by method over seeds; with ``paper`` the side-by-side table (:func:`paper_markdown`), else the
    table over seeds; with ``curves`` also the accuracy-vs-round figure. ``paper_rows_from``: paper
    method name -> the method or run label compared with it instead (:func:`with_rows`). (rows, text)."""
    for given, flag in (
        (paper_dataset is not None, "--paper-dataset"),
        (bool(paper_rows_from), "--paper-row"),
    ):
        if given and paper is None:
            raise ReportError(f"{flag} needs --paper")
    table = load_paper(paper) if paper is not None else None  # a bad name fails before any run is read
    if table is not None and paper_rows_from:
        table = with_rows(table, paper_rows_from)
    dirs, notes = expand_run_dirs(paths)
    groups = finished_runs(dirs, sweep_labels(paths))
    missing = sorted(set((paper_rows_from or {}).values()) - {name for name, _ in groups})
    if missing:
        raise ReportError(f"--paper-row: no completed runs of {', '.join(missing)}")
    if table is not None:
        rows, info = paper_rows(groups, table, paper_dataset)
        text = paper_markdown(rows, info)
    else:
        rows = methods_over_seeds(groups)
        text = seeds_markdown(rows, [("method", "method"), ("dataset", "dataset")])
    if curves is not None:
        text += f"\nAccuracy vs round (mean over seeds, min–max band): {write_curves(groups, curves)}\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    return rows, text
