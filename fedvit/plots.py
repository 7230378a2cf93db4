"""PNG plots of a run (matplotlib, no display needed).

Rounds evaluated on a sample of the clients (``server.eval_fraction < 1``) are drawn apart from
rounds where every client was evaluated: hollow markers, dotted line segments and dashed boxes,
with a legend entry "sampled (k of N clients)".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.collections import LineCollection
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from fedvit.evaluation import eval_mode


def _evaluated(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in data["rounds"] if "eval" in r and r["eval"]["test_acc"].get("n", 0) > 0]


def _count_label(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def sampled_label(rounds: list[dict[str, Any]]) -> str | None:
    """Legend text for the sampled rounds among ``rounds``: "sampled (k of N clients)"; None if none."""
    sampled = [r["eval"] for r in rounds if eval_mode(r) == "sampled"]
    if not sampled:
        return None
    k = [int(e.get("clients_evaluated", len(e["per_client"]))) for e in sampled]
    n = [int(e.get("clients_total", len(e["per_client"]))) for e in sampled]
    return f"sampled ({_count_label(k)} of {_count_label(n)} clients)"


def plot_run(data: dict[str, Any], run_dir: Path) -> list[Path]:
    """Write ``accuracy.png`` and ``clients.png``; returns the written paths."""
    rounds = _evaluated(data)
    if not rounds:
        return []
    title = f"{data.get('method')} on {data.get('dataset')} ({data.get('run_name')})"
    x = [r["round"] for r in rounds]
    full = [eval_mode(r) == "full" for r in rounds]
    label_sampled = sampled_label(rounds)
    out = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for split, color in (("test", "tab:blue"), ("val", "tab:orange")):
        stats = [r["eval"][f"{split}_acc"] for r in rounds]
        mean = [s.get("mean", float("nan")) for s in stats]
        std = [s.get("std", 0.0) for s in stats]
        # segments between two full rounds solid; a segment touching a sampled round faint
        segments = [((x[i], mean[i]), (x[i + 1], mean[i + 1])) for i in range(len(x) - 1)]
        solid = [full[i] and full[i + 1] for i in range(len(x) - 1)]
        for keep, ls, alpha in ((True, "-", 1.0), (False, ":", 0.7)):
            picked = [seg for seg, s in zip(segments, solid, strict=True) if s == keep]
            ax.add_collection(
                LineCollection(picked, colors=color, linewidths=1.5, linestyles=ls, alpha=alpha)
            )
        for is_full in (True, False):
            pts = [(xi, m) for xi, m, f in zip(x, mean, full, strict=True) if f == is_full]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    ls="none",
                    marker="o",
                    ms=5 if is_full else 4.5,
                    color=color,
                    markerfacecolor=color if is_full else "white",
                )
        ax.fill_between(
            x,
            [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)],
            color=color,
            alpha=0.15,
        )
        ax.plot(
            x,
            [s.get("weighted_mean", float("nan")) for s in stats],
            ls="--",
            lw=1.0,
            color=color,
            alpha=0.6,
        )
    handles = [
        Line2D([], [], color="tab:blue", marker="o", label="test: unweighted mean over clients (± std)"),
        Line2D([], [], color="tab:orange", marker="o", label="val: unweighted mean over clients (± std)"),
        Line2D([], [], color="gray", ls="--", label="weighted by examples"),
    ]
    if label_sampled is not None:
        handles += [
            Line2D([], [], color="gray", ls="none", marker="o", label="every client evaluated"),
            Line2D([], [], color="gray", ls=":", marker="o", markerfacecolor="white", label=label_sampled),
        ]
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("client top-1 accuracy (personalized models)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    out.append(run_dir / "accuracy.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    last_full = next((r for r, f in zip(reversed(rounds), reversed(full), strict=True) if f), rounds[-1])
    last = last_full["eval"]["per_client"]
    ids = sorted(last, key=lambda c: last[c]["test-acc"])
    ax1.bar(range(len(ids)), [last[c]["test-acc"] for c in ids], color="tab:blue")
    if len(ids) <= 40:  # beyond that the ids are unreadable
        ax1.set_xticks(range(len(ids)), ids, fontsize=6)
    ax1.set_xlabel("client (sorted)")
    ax1.set_ylabel("test accuracy")
    what = "" if eval_mode(last_full) == "full" else f", {sampled_label([last_full])}"
    ax1.set_title(f"per-client test accuracy, round {last_full['round']}{what}", fontsize=9)
    boxes = ax2.boxplot(
        [[m["test-acc"] for m in r["eval"]["per_client"].values()] for r in rounds],
        positions=x,
        flierprops={"markersize": 3},
    )
    for i, is_full in enumerate(full):
        if not is_full:  # a sampled round's box: dashed and gray
            for part in ("boxes", "medians"):
                boxes[part][i].set(ls="--", color="gray")
            boxes["fliers"][i].set(markeredgecolor="gray")
            for part in ("whiskers", "caps"):
                for j in (2 * i, 2 * i + 1):
                    boxes[part][j].set(ls="--", color="gray")
    if label_sampled is not None:
        ax2.legend(
            handles=[
                Line2D([], [], color="black", label="every client evaluated"),
                Line2D([], [], color="gray", ls="--", label=label_sampled),
            ],
            fontsize=7,
        )
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.xaxis.set_major_formatter(ScalarFormatter())
    ax2.set_xlabel("round")
    ax2.set_title("distribution over clients", fontsize=9)
    for a in (ax1, ax2):
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.append(run_dir / "clients.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- methods over seeds


def seed_curve(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Test accuracy (unweighted mean over clients) per round of one configuration's runs (one per
    seed): ``mean``, ``lo`` and ``hi`` (min and max) over seeds at each round in ``rounds``, the
    rounds every run evaluated on **every** client. Rounds evaluated on a sample of the clients in
    any run are left out (``sampled_rounds``): their means are over another subset of clients."""
    per_run: list[dict[int, float]] = []
    sampled: set[int] = set()
    for data in results:
        full: dict[int, float] = {}
        for r in _evaluated(dict(data)):
            if eval_mode(r) == "full":
                full[r["round"]] = float(r["eval"]["test_acc"]["mean"])
            else:
                sampled.add(r["round"])
        per_run.append(full)
    rounds = sorted(set.intersection(*(set(f) for f in per_run))) if per_run else []
    values = [[f[x] for f in per_run] for x in rounds]
    return {
        "rounds": rounds,
        "mean": [sum(v) / len(v) for v in values],
        "lo": [min(v) for v in values],
        "hi": [max(v) for v in values],
        "seeds": len(per_run),
        "sampled_rounds": sorted(sampled),
    }


def plot_curves(curves: Mapping[str, Mapping[str, Any]], out: Path, title: str = "") -> Path:
    """One line per configuration (``curves``: label -> :func:`seed_curve`): mean test accuracy over
    seeds per full-evaluation round, with a min–max band over seeds; writes ``out`` (PNG)."""
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    colors = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    for i, (label, c) in enumerate(curves.items()):
        color = colors(i % colors.N)
        ax.plot(c["rounds"], c["mean"], color=color, lw=1.5, label=f"{label} ({c['seeds']} seeds)")
        if c["seeds"] > 1:
            ax.fill_between(c["rounds"], c["lo"], c["hi"], color=color, alpha=0.15, lw=0)
    sampled = sorted({x for c in curves.values() for x in c["sampled_rounds"]})
    note = "band: min–max over seeds; rounds where every client was evaluated"
    if sampled:
        note += f" ({len(sampled)} rounds evaluated on a sample of clients left out)"
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("client top-1 test accuracy, mean over clients")
    ax.set_title(f"{title}\n{note}" if title else note, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 6 else 1)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
