"""Where does one method's lead over another come from under partial participation? Per client,
the accuracy difference of two methods against the number of rounds the client trained in.

    .venv/bin/python scripts/participation_gap.py SWEEP_DIR [SWEEP_DIR ...] A B [--round R]

A and B are run labels of the sweep directories (``fedbabu``, ``vanilla-attention``); their runs
are paired by seed. Two runs of one seed must have trained the same clients in every round (the
sweep's seeded client schedule); the comparison is then paired per client, and since the schedule
draws clients at random, a client's number of training rounds is a randomised treatment: a
correlation of A − B with it is the effect of participation, not of the client's data.

Printed per seed, at round R (default: each run's last round; a trimmed ``results.json`` keeps
the per-client evaluation of its last round only): the clients grouped by how many rounds they
trained (about four groups of similar size), each group's mean test accuracy under A and B and
the mean per-client difference, and Spearman's ρ between training rounds and A − B with its p.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from fedvit.report.runs import ReportError, load_run, run_seed, sweep_labels


@dataclass
class SeedGap:
    """One seed's paired comparison (accuracies as fractions)."""

    seed: Any
    round: int
    clients: list[str]
    trained: np.ndarray  # [clients]: rounds each client trained in, up to ``round``
    acc_a: np.ndarray  # [clients]
    acc_b: np.ndarray  # [clients]
    groups: list[tuple[int, int]]  # inclusive ranges of ``trained``
    rho: float
    p: float


def schedule(result: Mapping[str, Any], upto: int) -> list[list[str]]:
    """The clients each round up to ``upto`` trained, in round order."""
    return [
        sorted(str(c) for c in (x.get("train") or {}).get("clients") or [])
        for x in result["rounds"]
        if x["round"] <= upto
    ]


def per_client_acc(result: Mapping[str, Any], rnd: int, where: str) -> dict[str, float]:
    """Each client's test accuracy at round ``rnd``; a :class:`ReportError` when not recorded."""
    for x in result["rounds"]:
        if x["round"] == rnd and (x.get("eval") or {}).get("per_client"):
            return {str(c): float(m["test-acc"]) for c, m in x["eval"]["per_client"].items()}
    raise ReportError(
        f"{where}: no per-client evaluation at round {rnd} (a trimmed results.json keeps the last round's)"
    )


def groups_of(trained: np.ndarray, n_groups: int = 4) -> list[tuple[int, int]]:
    """Inclusive ranges of training-round counts, about ``n_groups`` groups of similar size: each
    cut falls at the count whose cumulative number of clients is nearest a multiple of
    ``len(trained) / n_groups`` (a count is never split between groups)."""
    values, sizes = np.unique(trained, return_counts=True)
    cumulative = np.cumsum(sizes)
    targets = len(trained) * np.arange(1, n_groups) / n_groups
    cuts = sorted({int(values[np.argmin(np.abs(cumulative - t))]) for t in targets} - {int(values[-1])})
    edges = [int(values[0]) - 1, *cuts, int(values[-1])]
    return [(lo + 1, hi) for lo, hi in itertools.pairwise(edges)]


def pair(a: Mapping[str, Any], b: Mapping[str, Any], where: str, rnd: int | None = None) -> SeedGap:
    """The paired comparison of two runs of one seed at round ``rnd`` (default: A's last round)."""
    last = max(x["round"] for x in a["rounds"])
    rnd = last if rnd is None else rnd
    sa, sb = schedule(a, rnd), schedule(b, rnd)
    if len(sa) != len(sb):
        raise ReportError(f"{where}: not paired, the runs recorded {len(sa)} and {len(sb)} rounds")
    for i, (ca, cb) in enumerate(zip(sa, sb, strict=True)):
        if ca != cb:
            raise ReportError(f"{where}: not paired, the runs trained different clients in round {i + 1}")
    acc_a, acc_b = per_client_acc(a, rnd, f"{where} (A)"), per_client_acc(b, rnd, f"{where} (B)")
    if set(acc_a) != set(acc_b):
        raise ReportError(f"{where}: the runs evaluated different clients at round {rnd}")
    clients = sorted(acc_a, key=lambda c: (len(c), c))
    counts = Counter(c for trained_now in sa for c in trained_now)
    trained = np.array([counts[c] for c in clients])
    va, vb = np.array([acc_a[c] for c in clients]), np.array([acc_b[c] for c in clients])
    if np.ptp(trained) == 0 or np.ptp(va - vb) == 0:  # ρ is undefined for a constant
        rho, p = float("nan"), float("nan")
    else:
        test = spearmanr(trained, va - vb)
        rho, p = float(test.statistic), float(test.pvalue)
    return SeedGap(a.get("config", {}).get("seed"), rnd, clients, trained, va, vb, groups_of(trained), rho, p)


def runs_by_seed(sweeps: Sequence[Path], label: str) -> dict[Any, Mapping[str, Any]]:
    """``results.json`` of the completed runs labelled ``label`` in the sweep directories, by seed."""
    found: dict[Any, Mapping[str, Any]] = {}
    for run_dir, run_label in sweep_labels(sweeps).items():
        if run_label != label or not (run_dir / "results.json").is_file():
            continue
        result = load_run(run_dir)
        if result.get("status") == "completed":
            found[run_seed(result)] = result
    if not found:
        raise ReportError(f"no completed run labelled {label!r} in {', '.join(map(str, sweeps))}")
    return found


def compare(sweeps: Sequence[Path], a: str, b: str, rnd: int | None = None) -> list[SeedGap]:
    """One :class:`SeedGap` per seed that both labels completed."""
    runs_a, runs_b = runs_by_seed(sweeps, a), runs_by_seed(sweeps, b)
    seeds = sorted(set(runs_a) & set(runs_b), key=str)
    if not seeds:
        raise ReportError(f"{a!r} and {b!r} share no seed")
    return [pair(runs_a[s], runs_b[s], f"{a} vs {b}, seed {s}", rnd) for s in seeds]


def render(gaps: Sequence[SeedGap], a: str, b: str) -> str:
    lines = []
    for g in gaps:
        pa, pb = g.acc_a * 100, g.acc_b * 100
        d = pa - pb
        lines += [
            f"seed {g.seed}, round {g.round}: {a} {pa.mean():.2f}, {b} {pb.mean():.2f}, difference "
            f"{d.mean():+.2f} points; Spearman ρ(rounds trained, {a} − {b}) = {g.rho:+.3f} (p = {g.p:.2g})",
            f"| rounds trained | clients | {a} % | {b} % | {a} − {b} |",
            "|---|---|---|---|---|",
        ]
        for lo, hi in g.groups:
            k = (g.trained >= lo) & (g.trained <= hi)
            span = f"{lo}" if lo == hi else f"{lo}–{hi}"
            lines.append(
                f"| {span} | {k.sum()} | {pa[k].mean():.2f} | {pb[k].mean():.2f} | {d[k].mean():+.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep directories, then the labels A and B")
    parser.add_argument("--round", type=int, default=None, help="the round compared (default: the last)")
    args = parser.parse_args(argv)
    if len(args.sweeps) < 3:
        parser.error("give at least one sweep directory and the two labels A and B")
    *sweeps, a, b = args.sweeps
    try:
        print(render(compare(sweeps, str(a), str(b), args.round), str(a), str(b)))
    except ReportError as err:
        print(f"participation_gap: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
