"""Accuracy against ε of a DP sweep (conf/sweep/issue18-dp-organamnist.yaml): one line per method,
the last round's mean client test accuracy (band: ± its std over clients) at each ε, and the run
without DP drawn at the right edge ("no DP").

    .venv/bin/python scripts/dp_figure.py SWEEP_DIR [-o FILE.png]

Every completed run directory of the sweep counts; ε is the one its results.json reports for its
last round (``rounds[-1].train.privacy.epsilon``), so the figure shows what was spent, not what
was asked for.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def points(sweep: Path) -> dict[str, list[tuple[float | None, float, float]]]:
    """method -> [(ε or None without DP, mean accuracy %, std over clients %)], sorted by ε."""
    out: dict[str, list[tuple[float | None, float, float]]] = {}
    for results in sorted(sweep.glob("*/results.json")):
        r = json.loads(results.read_text())
        if r.get("status") != "completed":
            continue
        acc = r["summary"]["last_round"]["test_acc"]
        privacy = (r["rounds"][-1].get("train") or {}).get("privacy")
        eps = float(privacy["epsilon"]) if privacy else None
        out.setdefault(str(r["method"]), []).append((eps, 100 * acc["mean"], 100 * acc["std"]))
    for rows in out.values():
        rows.sort(key=lambda p: float("inf") if p[0] is None else p[0])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("-o", "--out", type=Path)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = points(args.sweep)
    if not data:
        parser.error(f"{args.sweep}: no completed runs")
    finite = sorted({e for rows in data.values() for e, _, _ in rows if e is not None})
    no_dp_x = (max(finite) * 1.6) if finite else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, rows in sorted(data.items()):
        xs = [no_dp_x if e is None else e for e, _, _ in rows]
        ys = [m for _, m, _ in rows]
        sd = [s for _, _, s in rows]
        line = ax.plot(xs, ys, marker="o", label=method)[0]
        ax.fill_between(
            xs,
            [y - s for y, s in zip(ys, sd, strict=True)],
            [y + s for y, s in zip(ys, sd, strict=True)],
            color=line.get_color(),
            alpha=0.15,
        )
    ax.set_xscale("log")
    ticks = [*finite, no_dp_x]
    ax.set_xticks(ticks, [f"{e:.3g}" for e in finite] + ["no DP"])
    ax.minorticks_off()
    ax.set_xlabel("ε after the last round (δ as configured)")
    ax.set_ylabel("client test accuracy %, mean (band ± std over clients)")
    ax.set_title(f"accuracy vs ε: {args.sweep.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    out = args.out or args.sweep / "accuracy-vs-epsilon.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)
    for method, rows in sorted(data.items()):
        cells = ", ".join(f"{'no DP' if e is None else f'ε {e:.2f}'}: {m:.2f} ± {s:.2f}" for e, m, s in rows)
        print(f"{method}: {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
