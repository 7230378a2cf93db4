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
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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


def _fmt(v: Any, spec: str = "") -> str:
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
            f"| {_fmt(r['params_stored'], ',')} ({_fmt(r['storage_pct'], '.1f')}%) "
            f"| {_fmt(r['flops'], ',')} ({_fmt(r['compute_pct'], '.1f')}%) "
            f"| {_fmt(r['params_sent_up'], ',')} ({_fmt(r['comm_pct'], '.1f')}%) |"
        )
    return head + "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


# --------------------------------------------------------------------------- over seeds


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample std) of ``values``; the std needs two values, the mean one."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def over_seeds(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One configuration's completed runs (one per seed, their ``results.json``) -> mean ± std
    over seeds of the clients' mean test accuracy at the last round (``last_*``) and at the
    best-validation round (``best_*``), and the mean over seeds of the std over clients at the
    last round (``client_std_mean``). Accuracies are fractions."""
    last, best, spread = [], [], []
    for r in results:
        summary = r.get("summary") or {}
        acc = (summary.get("last_round") or {}).get("test_acc") or {}
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


# --------------------------------------------------------------------------- runs grouped by method


def expand_run_dirs(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """Run directories of ``paths``: a sweep directory (``sweep.json``) stands for its runs that
    have completed (the others are left out and named in the returned notes); any other path is a
    run directory and must hold a completed run (:func:`finished_runs` checks)."""
    dirs: list[Path] = []
    notes: list[str] = []
    for path in paths:
        manifest = Path(path) / "sweep.json"
        if not manifest.is_file():
            dirs.append(Path(path))
            continue
        try:
            names = [str(e["name"]) for e in json.loads(manifest.read_text())["runs"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ReportError(f"{manifest}: not a readable sweep manifest ({err})") from err
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


def finished_runs(run_dirs: Sequence[Path]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """``results.json`` of completed runs grouped by (method, dataset), one run per seed; a run
    directory without results, not completed, or a second run of a method with the same seed
    (two configurations of one method) is a :class:`ReportError`."""
    if not run_dirs:
        raise ReportError("no run directories to report")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    seen: dict[tuple[str, str, Any], Path] = {}
    for d in run_dirs:
        r = load_run(d)
        if r.get("status") != "completed":
            raise ReportError(f"{d}: the run has not completed (status {r.get('status')!r})")
        if not (r.get("summary") or {}).get("last_round"):
            raise ReportError(f"{d}: no round evaluated on every client")
        key = (str(r.get("method")), str(r.get("dataset")))
        seed = (r.get("config") or {}).get("seed")
        if (*key, seed) in seen:
            raise ReportError(
                f"{d} and {seen[(*key, seed)]}: two runs of {key[0]} on {key[1]} with seed {seed}; "
                "pass one configuration per method"
            )
        seen[(*key, seed)] = Path(d)
        groups.setdefault(key, []).append(r)
    return groups


def methods_over_seeds(groups: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One :func:`over_seeds` row per (method, dataset) of :func:`finished_runs`."""
    return [{"method": m, "dataset": ds, **over_seeds(runs)} for (m, ds), runs in groups.items()]


# --------------------------------------------------------------------------- a paper column


@dataclass(frozen=True)
class PaperMethod:
    """One method of a published table: its name there and {column: (mean %, std % over clients)}."""

    paper_name: str
    values: dict[str, tuple[float, float]]


@dataclass(frozen=True)
class PaperTable:
    """A published table (``conf/paper/<name>.yaml``)."""

    name: str
    title: str
    metric: str
    columns: dict[str, tuple[str, tuple[str, ...]]]  # key -> (title, fedvit dataset names)
    methods: dict[str, PaperMethod]  # fedvit method name -> the paper's numbers
    not_in_paper: dict[str, str] = field(default_factory=dict)  # fedvit method -> why no value


def paper_names() -> list[str]:
    """Names of the tables in ``conf/paper/``."""
    from fedvit.config import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / "paper").glob("*.yaml"))


def _pair(value: Any, where: str) -> tuple[float, float]:
    if not isinstance(value, Mapping) or set(value) != {"mean", "std"}:
        raise ReportError(f"{where}: expected {{mean: <%>, std: <%>}}, got {value!r}")
    try:
        return float(value["mean"]), float(value["std"])
    except (TypeError, ValueError) as err:
        raise ReportError(f"{where}: mean and std must be numbers ({err})") from err


def load_paper(name_or_path: str | Path) -> PaperTable:
    """A published table by name (``conf/paper/<name>.yaml``, also from an installed fedvit) or
    from a YAML file's path."""
    from omegaconf import OmegaConf

    from fedvit.config import CONF_DIR

    text = str(name_or_path)
    path = Path(text).expanduser()
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        path = CONF_DIR / "paper" / f"{text}.yaml"
        if not path.is_file():
            raise ReportError(f"--paper: no published table '{text}'; known: {', '.join(paper_names())}")
    if not path.is_file():
        raise ReportError(f"--paper: {path} does not exist")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # OmegaConf/YAML parse errors of many kinds
        raise ReportError(f"{path}: not readable YAML ({err})") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), dict) or not raw["datasets"]:
        raise ReportError(f"{path}: needs a non-empty 'datasets' mapping")
    if not isinstance(raw.get("methods"), dict) or not raw["methods"]:
        raise ReportError(f"{path}: needs a non-empty 'methods' mapping")
    columns: dict[str, tuple[str, tuple[str, ...]]] = {}
    for key, col in raw["datasets"].items():
        col = col or {}
        aliases = col.get("fedvit") or [key]
        columns[str(key)] = (str(col.get("title", key)), tuple(str(a) for a in aliases))
    methods: dict[str, PaperMethod] = {}
    for paper_name, entry in raw["methods"].items():
        where = f"{path}: methods.{paper_name}"
        if not isinstance(entry, dict) or not entry.get("fedvit"):
            raise ReportError(f"{where}: needs 'fedvit' (the fedvit method name)")
        unknown = set(entry) - {"fedvit", *columns}
        if unknown:
            raise ReportError(f"{where}: unknown column(s) {sorted(unknown)}; columns: {sorted(columns)}")
        fedvit_name = str(entry["fedvit"])
        if fedvit_name in methods:
            raise ReportError(f"{where}: fedvit method '{fedvit_name}' is mapped twice")
        values = {c: _pair(entry[c], f"{where}.{c}") for c in columns if entry.get(c) is not None}
        methods[fedvit_name] = PaperMethod(str(paper_name), values)
    return PaperTable(
        name=str(raw.get("name", path.stem)),
        title=str(raw.get("title", path.stem)),
        metric=str(raw.get("metric", "")),
        columns=columns,
        methods=methods,
        not_in_paper={str(k): str(v) for k, v in (raw.get("not_in_paper") or {}).items()},
    )


def paper_column(paper: PaperTable, datasets: Sequence[str], chosen: str | None = None) -> str:
    """The column of ``paper`` to compare runs on ``datasets`` with: ``chosen`` (a column key or
    one of its fedvit dataset names) or the column holding the runs' one dataset."""
    if chosen is not None:
        for key, (_, aliases) in paper.columns.items():
            if chosen == key or chosen in aliases:
                return key
        raise ReportError(
            f"--paper-dataset: {paper.name} has no column '{chosen}'; columns: {', '.join(paper.columns)}"
        )
    if len(set(datasets)) != 1:
        raise ReportError(f"runs on several datasets ({', '.join(sorted(set(datasets)))}): one at a time")
    dataset = datasets[0]
    for key, (_, aliases) in paper.columns.items():
        if dataset == key or dataset in aliases:
            return key
    raise ReportError(
        f"the runs are on '{dataset}', which no column of {paper.name} holds "
        f"({', '.join(paper.columns)}); pass --paper-dataset"
    )


def _ranks(values: Sequence[float]) -> list[int]:
    """1 = the highest value; ties share the best rank of the tie ("min" ranking)."""
    from scipy.stats import rankdata

    return [int(r) for r in rankdata([-v for v in values], method="min")]


def paper_rows(
    groups: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]],
    paper: PaperTable,
    dataset: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (one per method, the paper's order, then methods without a paper value) and the
    comparison: both rank orders over the methods with a paper value and Kendall's τ-b between
    them (``scipy.stats.kendalltau``). Our accuracies are fractions; the paper's are in %."""
    from scipy.stats import kendalltau

    datasets = sorted({ds for _, ds in groups})
    if len(datasets) != 1:
        raise ReportError(f"runs on several datasets ({', '.join(datasets)}): one at a time")
    column = paper_column(paper, datasets, dataset)
    ours = {row["method"]: row for row in methods_over_seeds(groups)}
    order = [m for m in paper.methods if m in ours] + [m for m in ours if m not in paper.methods]
    rows = []
    for m in order:
        o = ours[m]
        pv = paper.methods[m].values.get(column) if m in paper.methods else None
        rows.append(
            {
                "method": paper.methods[m].paper_name if m in paper.methods else "",
                "fedvit": m,
                "dataset": o["dataset"],
                "seeds": o["seeds_done"],
                "ours_mean": o["last_mean"],
                "ours_std_seeds": o["last_std"],
                "ours_std_clients": o["client_std_mean"],
                "paper_mean": pv[0] if pv else None,
                "paper_std_clients": pv[1] if pv else None,
                "rank_ours": None,
                "rank_paper": None,
            }
        )
    compared = [r for r in rows if r["paper_mean"] is not None and r["ours_mean"] is not None]
    for key, val in (("rank_ours", "ours_mean"), ("rank_paper", "paper_mean")):
        for r, rank in zip(compared, _ranks([r[val] for r in compared]), strict=True):
            r[key] = rank
    tau = p_value = None
    if len(compared) >= 2:
        result = kendalltau([r["ours_mean"] for r in compared], [r["paper_mean"] for r in compared])
        tau, p_value = float(result.statistic), float(result.pvalue)

    def label(r: Mapping[str, Any]) -> str:
        return r["method"] if r["method"] == r["fedvit"] else f"{r['method']} ({r['fedvit']})"

    info = {
        "paper": paper.name,
        "title": paper.title,
        "metric": paper.metric,
        "column": column,
        "column_title": paper.columns[column][0],
        "dataset": rows[0]["dataset"] if rows else None,
        "compared": len(compared),
        "tau": tau,
        "p_value": p_value,
        "order_ours": [label(r) for r in sorted(compared, key=lambda r: (r["rank_ours"], r["fedvit"]))],
        "order_paper": [label(r) for r in sorted(compared, key=lambda r: (r["rank_paper"], r["fedvit"]))],
        "without_paper_value": {
            r["fedvit"]: paper.not_in_paper.get(r["fedvit"], "not in the paper")
            for r in rows
            if r not in compared
        },
        "not_run": [
            pm_.paper_name for m, pm_ in paper.methods.items() if m not in ours and column in pm_.values
        ],
    }
    return rows, info


def _nan_free(value: float | None) -> bool:
    return value is not None and value == value


def paper_markdown(rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any]) -> str:
    """The side-by-side table, the two rank orders and τ, and what was left out of τ."""
    ds = info["dataset"]
    lines = [
        f"{info['title']}, {info['column_title']} column, beside fedvit runs on {ds} "
        f"(ours: last round; mean ± std over seeds of the clients' mean accuracy, and the mean over "
        f"seeds of the std over clients; paper: {info['metric']})",
        "",
        "| method (paper) | fedvit | seeds | ours: acc. % (mean ± std over seeds) | ours: std over clients % "
        "| paper: acc. % ± std over clients | Δ (pts) | rank ours | rank paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread, theirs = r["ours_std_clients"], r["paper_mean"]
        cells = [
            r["method"] or "–",
            r["fedvit"],
            str(r["seeds"]),
            pm(r["ours_mean"], r["ours_std_seeds"]),
            "–" if spread is None else f"{100 * spread:.2f}",
            "–" if theirs is None else f"{theirs:.2f} ± {r['paper_std_clients']:.2f}",
            "–" if theirs is None or r["ours_mean"] is None else f"{100 * r['ours_mean'] - theirs:+.2f}",
            _fmt(r["rank_ours"]),
            _fmt(r["rank_paper"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Rank order, ours:  {' > '.join(info['order_ours']) or '–'}")
    lines.append(f"Rank order, paper: {' > '.join(info['order_paper']) or '–'}")
    if _nan_free(info["tau"]):
        lines.append(
            f"Kendall's τ-b (scipy.stats.kendalltau) over the {info['compared']} methods with a paper "
            f"value: {info['tau']:.3f} (p = {info['p_value']:.3g})"
        )
    else:
        why = "fewer than 2 methods with a paper value" if info["compared"] < 2 else "a constant ranking"
        lines.append(f"Kendall's τ: not defined ({why})")
    if info["without_paper_value"]:
        lines.append("")
        lines.append("Without a paper value (in the table, left out of the ranks and τ):")
        lines += [f"- {m}: {why}" for m, why in info["without_paper_value"].items()]
    if info["not_run"]:
        lines.append("")
        lines.append(f"In the paper, not among these runs: {', '.join(info['not_run'])}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- accuracy vs round


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
    curves: Path | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """``fedvit report --paper/--curves``: the runs of ``paths`` (run or sweep directories) grouped
    by method over seeds; with ``paper`` the side-by-side table (:func:`paper_markdown`), else the
    table over seeds; with ``curves`` also the accuracy-vs-round figure. (rows, text)."""
    if paper_dataset is not None and paper is None:
        raise ReportError("--paper-dataset needs --paper")
    table = load_paper(paper) if paper is not None else None  # a bad name fails before any run is read
    dirs, notes = expand_run_dirs(paths)
    groups = finished_runs(dirs)
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
