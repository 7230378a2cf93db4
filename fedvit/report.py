"""Tables from finished runs: ``fedvit report RUN_DIR...``.

One row per run: client accuracy (mean ± std over clients, unweighted, and the example-weighted
mean) at the chosen round, and the resources, each also relative to FedAvg on the same dataset
(FedAvg's model is the plain model: ``params_model`` and its FLOPs) like the FedPerfix paper's
Table 2: storage (parameters a client holds), computation (forward FLOPs per sample),
communication (parameters sent up per round).
"""

from __future__ import annotations

import csv
import io
import json
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
