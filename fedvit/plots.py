"""PNG plots of a run (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _evaluated(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in data["rounds"] if "eval" in r and r["eval"]["test_acc"].get("n", 0) > 0]


def plot_run(data: dict[str, Any], run_dir: Path) -> list[Path]:
    """Write ``accuracy.png`` and ``clients.png``; returns the written paths."""
    rounds = _evaluated(data)
    if not rounds:
        return []
    title = f"{data.get('method')} on {data.get('dataset')} ({data.get('run_name')})"
    x = [r["round"] for r in rounds]
    out = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for split, color in (("test", "tab:blue"), ("val", "tab:orange")):
        stats = [r["eval"][f"{split}_acc"] for r in rounds]
        mean = [s.get("mean", float("nan")) for s in stats]
        std = [s.get("std", 0.0) for s in stats]
        ax.plot(x, mean, marker="o", color=color, label=f"{split}: unweighted mean over clients")
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
            color=color,
            label=f"{split}: weighted by examples",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("client top-1 accuracy (personalized models)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(run_dir / "accuracy.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    last = rounds[-1]["eval"]["per_client"]
    ids = sorted(last, key=lambda c: last[c]["test-acc"])
    ax1.bar(range(len(ids)), [last[c]["test-acc"] for c in ids], color="tab:blue")
    ax1.set_xticks(range(len(ids)), ids, fontsize=6)
    ax1.set_xlabel("client (sorted)")
    ax1.set_ylabel("test accuracy")
    ax1.set_title(f"per-client test accuracy, round {rounds[-1]['round']}", fontsize=9)
    ax2.boxplot([[m["test-acc"] for m in r["eval"]["per_client"].values()] for r in rounds], positions=x)
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
