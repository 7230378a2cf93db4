"""A paper column (``fedvit report --paper NAME``): a published table (``conf/paper/<NAME>.yaml`` or a
YAML path, :func:`load_paper`), each method's numbers over seeds beside the paper's with both rank
orders and Kendall's τ (:func:`paper_rows`, :func:`paper_markdown`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedvit.report.runs import ReportError, fmt_cell, last_round_acc, methods_over_seeds, pm, run_seed


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


def with_rows(paper: PaperTable, rows: Mapping[str, str]) -> PaperTable:
    """``paper`` with some of its methods compared with other runs: ``rows`` maps the paper's method
    name (``FedBABU``) to the fedvit method or run label whose runs take its row
    (``fedbabu-authors``). The method that held the row keeps its runs' row, without a paper value.
    An unknown paper method, or two rows given the same runs, is a :class:`ReportError`."""
    by_name = {m.paper_name: key for key, m in paper.methods.items()}
    unknown = sorted(set(rows) - set(by_name))
    if unknown:
        raise ReportError(
            f"--paper-row: {', '.join(unknown)} not in {paper.name} (its methods: {', '.join(by_name)})"
        )
    keys = {by_name[name]: label for name, label in rows.items()}
    methods = {keys.get(k, k): m for k, m in paper.methods.items()}
    if len(methods) != len(paper.methods):  # two rows landed on one key
        raise ReportError("--paper-row: two of the paper's rows would take the same runs")
    moved = {
        k: f"the paper's {paper.methods[k].paper_name} row compares {label} here (--paper-row)"
        for k, label in keys.items()
    }
    return replace(paper, methods=methods, not_in_paper={**paper.not_in_paper, **moved})


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
                "rank_per_seed": [],  # for the compared methods: :func:`_per_seed`
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
    seeds, ranks_per_seed, tau_per_seed = _per_seed(groups, compared, datasets[0])
    for r in compared:
        r["rank_per_seed"] = ranks_per_seed[r["fedvit"]]

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
        "seeds_common": seeds,
        "tau_per_seed": tau_per_seed,
        "order_ours": [label(r) for r in sorted(compared, key=lambda r: (r["rank_ours"], r["fedvit"]))],
        "order_paper": [label(r) for r in sorted(compared, key=lambda r: (r["rank_paper"], r["fedvit"]))],
        "without_paper_value": {
            r["fedvit"]: _without_paper_value(r["fedvit"], groups[(r["fedvit"], r["dataset"])], paper)
            for r in rows
            if r not in compared
        },
        "not_run": [
            pm_.paper_name for m, pm_ in paper.methods.items() if m not in ours and column in pm_.values
        ],
    }
    return rows, info


def _without_paper_value(name: str, runs: Sequence[Mapping[str, Any]], paper: PaperTable) -> str:
    """Why row ``name`` has no paper value: the table's own note, or, for a labelled row of a
    sweep (another configuration of a method, e.g. ``fedbabu-authors``), the method it runs."""
    if name in paper.not_in_paper:
        return paper.not_in_paper[name]
    methods = {str(r.get("method")) for r in runs}
    if len(methods) == 1 and (method := methods.pop()) != name:
        known = paper.methods.get(method)
        of = f"{method}, the paper's {known.paper_name}" if known else method
        return f"another configuration of {of} (run label {name}); outside the ranks"
    return "not in the paper"


def _per_seed(
    groups: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]],
    compared: list[dict[str, Any]],
    dataset: str,
) -> tuple[list[Any], dict[str, list[int]], dict[Any, float | None]]:
    """The seeds every compared method has, each compared method's rank on each of them (in the
    seeds' order) and Kendall's τ-b against the paper on each: how much of a rank difference our
    own seeds already show."""
    from scipy.stats import kendalltau

    by_seed = {
        r["fedvit"]: {
            run_seed(run): acc["mean"]
            for run in groups[(r["fedvit"], dataset)]
            if (acc := last_round_acc(run)).get("mean") is not None
        }
        for r in compared
    }
    common = set.intersection(*(set(v) for v in by_seed.values())) if by_seed else set()
    seeds = sorted(common, key=lambda x: (0, x, "") if isinstance(x, int) else (1, 0, str(x)))
    ranks: dict[str, list[int]] = {r["fedvit"]: [] for r in compared}
    taus: dict[Any, float | None] = {}
    for seed in seeds:
        values = [by_seed[r["fedvit"]][seed] for r in compared]
        for r, rank in zip(compared, _ranks(values), strict=True):
            ranks[r["fedvit"]].append(rank)
        tau = kendalltau(values, [r["paper_mean"] for r in compared]).statistic if len(values) >= 2 else None
        taus[seed] = float(tau) if _nan_free(tau) else None
    return seeds, ranks, taus


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
        "| paper: acc. % ± std over clients | Δ (pts) | rank ours | rank paper | rank ours per seed |",
        "|---|---|---|---|---|---|---|---|---|---|",
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
            fmt_cell(r["rank_ours"]),
            fmt_cell(r["rank_paper"]),
            ", ".join(map(str, r["rank_per_seed"])) or "–",
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
    if info["seeds_common"]:
        taus = info["tau_per_seed"].items()
        per_seed = ", ".join(f"seed {seed}: " + ("–" if t is None else f"{t:.3f}") for seed, t in taus)
        lines.append(
            f"On each seed every compared method has (ranks in the table's last column): τ-b {per_seed}"
        )
    if info["without_paper_value"]:
        lines.append("")
        lines.append("Without a paper value (in the table, left out of the ranks and τ):")
        lines += [f"- {m}: {why}" for m, why in info["without_paper_value"].items()]
    if info["not_run"]:
        lines.append("")
        lines.append(f"In the paper, not among these runs: {', '.join(info['not_run'])}")
    return "\n".join(lines) + "\n"
