"""What did pFedLA's hypernetworks learn? Compare a pFedLA / HeurpFedLA run's checkpointed
hypernetworks with their seeded initialization, α with α at the start, and measure the signal
that moves α at the checkpoint.

    .venv/bin/python scripts/pfedla_hnet_movement.py RUN_DIR

The strategy is rebuilt from the run's ``config.yaml`` through the registry and its own
``from_config`` (its seeded hypernetworks and initial model) in a temporary directory; then it
loads the run's checkpoint (the hypernetworks and the model store's files it refers to are
copied there first: nothing is written into RUN_DIR). Printed:

1. per hypernetwork parameter group (client embeddings, MLP weights and biases, heads' weights
   and biases) over all clients: ``final ≈ s · init + r``, the range of ``s`` and ``|r|/|final|``;
2. α at initialization and at the checkpoint: per layer the largest ``|Δα|``, the range of α, and
   Pearson's r between α_ij and the label overlap of i and j (i ≠ j) at both;
3. the gradient signal at the checkpoint, per layer (median over clients): ``G_ij = <θ_j, Δ_i>``
   with ``Δ_i ≈ θ̄_i − θ_i`` (θ̄_i from the stored models and the checkpoint's α, θ_i client i's
   stored model: the round's true Δ_i used θ̄_i of the models one round older, which the store no
   longer has), its spread over j relative to its mean (only the spread moves α through the
   normalization), and the α change one hypernetwork step along it makes (the strategy's own
   update, applied to the temporary copy), against the whole run's ``|Δα|``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hnet_fit import print_group_fits  # scripts/: shared with fedtp_hnet_movement.py


@dataclass
class Movement:
    """Everything the script prints, as numbers (tests read these)."""

    layers: list[str]
    init_hnets: list[dict[str, np.ndarray]]  # per client: the seeded state dict
    final_hnets: list[dict[str, np.ndarray]]  # per client: the checkpoint's
    alpha_init: np.ndarray  # [N, L, N]
    alpha_final: np.ndarray  # [N, L, N]
    overlap: np.ndarray | None  # [N, N] label overlap (None: no histograms in results.json)
    gradient: np.ndarray  # [N, L, N]: G_ij per layer, from Δ_i ≈ θ̄_i − θ_i
    one_step: np.ndarray  # [N, L]: max_j |Δα_ij| of one hypernetwork step along G_i
    delta_norm: np.ndarray  # [N, L]: |Δ_i^l|
    raw_total: np.ndarray  # [N, L]: Σ_j ReLU(head_l(h_i))_j at the checkpoint (α = raw / this)
    round: int


def rebuild(run_dir: Path, work: Path) -> tuple[Any, Any]:
    """(config, the run's strategy at its seeded initialization, its state under ``work``)."""
    from fedvit.export import config_from_yaml
    from fedvit.models import build_model
    from fedvit.params import ParameterSplit
    from fedvit.registry import get_strategy

    cfg = config_from_yaml(run_dir / "config.yaml")
    model = build_model(cfg)
    split = ParameterSplit.from_model(model, cfg.method.private)
    cls = get_strategy(cfg.method.strategy)
    strategy = cls.from_config(
        cfg, model=model, split=split, recorder=None, run_dir=work, run_name="movement"
    )
    if not hasattr(strategy, "agg"):
        raise SystemExit(f"{run_dir}: method.strategy={cfg.method.strategy!r} is not pFedLA / HeurpFedLA")
    return cfg, strategy


def hnet_states(strategy: Any) -> list[dict[str, np.ndarray]]:
    return [{k: v.detach().numpy().copy() for k, v in h.state_dict().items()} for h in strategy.agg.hnets]


def measure(run_dir: Path, work: Path) -> Movement:
    """Rebuild, load the checkpoint into ``work``, and measure (see the module docstring)."""
    from strategies.pfedla_alpha import label_histograms, label_overlap

    run_dir = Path(run_dir)
    _, strategy = rebuild(run_dir, work)
    agg = strategy.agg
    init_hnets = hnet_states(strategy)
    alpha_init = strategy.alpha_matrix(0).alpha
    run_store = run_dir / "model-store"
    if not (run_dir / "checkpoint").is_dir() or not run_store.is_dir():
        raise SystemExit(f"{run_dir}: no checkpoint/ or model-store/ (a pFedLA run with server.checkpoint)")
    for p in run_store.glob("client-*.npy"):
        shutil.copyfile(p, agg.store.root / p.name)
    if not np.array_equal(np.load(run_store / "initial.npy"), np.load(agg.store.root / "initial.npy")):
        raise SystemExit(
            f"{run_dir}: the rebuilt initial model differs from the run's model-store/initial.npy"
        )
    rnd, _ = strategy.load_checkpoint(run_dir / "checkpoint")
    final_hnets = hnet_states(strategy)
    alpha_final = strategy.alpha_matrix(rnd).alpha
    hists = label_histograms(run_dir, strategy.num_clients)
    overlap = label_overlap(hists) if hists is not None else None

    n, layers = strategy.num_clients, agg.num_layers
    gradient = np.zeros((n, layers, n))
    one_step = np.zeros((n, layers))
    delta_norm = np.zeros((n, layers))
    with torch.no_grad():
        raw_total = np.array(
            [[float(torch.relu(head(h.mlp(h.embedding))).sum()) for head in h.heads] for h in agg.hnets]
        )
    thetas = [agg.store.read(i) for i in range(n)]  # before the steps below write new versions
    for i in range(n):
        delta = agg.personalized_flat(i).astype(np.float64) - thetas[i].astype(np.float64)
        gradient[i] = agg.alpha_gradient(delta)
        delta_norm[i] = [np.linalg.norm(delta[a:b]) for a, b in agg.bounds]
        before = agg.weights(i)
        agg.update(i, thetas[i], version=agg.store.versions[i] + 1)  # the strategy's step; same θ_i
        with torch.no_grad():
            one_step[i] = np.abs(agg.weights(i) - before).max(axis=1)
    return Movement(
        agg.layer_names,
        init_hnets,
        final_hnets,
        alpha_init,
        alpha_final,
        overlap,
        gradient,
        one_step,
        delta_norm,
        raw_total,
        rnd,
    )


def relative_spread(gradient: np.ndarray) -> np.ndarray:
    """``[N, L]``: ``(max_j G_ij − min_j G_ij) / |mean_j G_ij|`` per client and layer."""
    return np.ptp(gradient, axis=2) / np.maximum(np.abs(gradient.mean(axis=2)), 1e-300)


def report(m: Movement, run_dir: Path) -> None:
    n = len(m.init_hnets)
    print(f"{run_dir}: round {m.round}, {n} clients, layers {m.layers}")
    print("hypernetworks at the checkpoint vs their seeded initialization (final ≈ s·init + r), all clients:")
    keys = list(m.init_hnets[0])
    init = {f"{i}.{k}": h[k] for i, h in enumerate(m.init_hnets) for k in keys}
    final = {f"{i}.{k}": h[k] for i, h in enumerate(m.final_hnets) for k in keys}

    def pick(pred) -> list[str]:
        return [f"{i}.{k}" for i in range(n) for k in keys if pred(k)]

    rows = {
        "client embeddings": pick(lambda k: k == "embedding"),
        "MLP weights": pick(lambda k: k.startswith("mlp.") and k.endswith("weight")),
        "MLP biases": pick(lambda k: k.startswith("mlp.") and k.endswith("bias")),
        "heads' weights": pick(lambda k: k.startswith("heads.") and k.endswith("weight")),
        "heads' biases": pick(lambda k: k.startswith("heads.") and k.endswith("bias")),
    }
    print_group_fits(rows, init, final)
    moved = np.abs(m.alpha_final - m.alpha_init).max(axis=(0, 2))
    from strategies.pfedla_alpha import layer_correlations

    r0 = layer_correlations(m.alpha_init, m.overlap) if m.overlap is not None else None
    r1 = layer_correlations(m.alpha_final, m.overlap) if m.overlap is not None else None
    print("α per layer: max |Δα| over the run; α range at init / at the checkpoint; r(α, label overlap)")
    for layer, name in enumerate(m.layers):
        a0, a1 = m.alpha_init[:, layer], m.alpha_final[:, layer]
        corr = f"{r0[layer]:+.3f} -> {r1[layer]:+.3f}" if r0 is not None else "n/a (no label histograms)"
        print(
            f"  {name:10s} |Δα| {moved[layer]:.2e}   α {a0.min():.4f}..{a0.max():.4f}"
            f" / {a1.min():.4f}..{a1.max():.4f}   r {corr}"
        )
    print(
        "gradient signal at the checkpoint per layer, median over clients i: |Δ_i|, spread_j G_ij "
        "(absolute and / |mean_j G_ij|), Σ_j raw head output (α = raw / Σ), max_j |Δα_ij| of one step"
    )
    med = {
        "delta": np.median(m.delta_norm, axis=0),
        "spread": np.median(np.ptp(m.gradient, axis=2), axis=0),
        "relative": np.median(relative_spread(m.gradient), axis=0),
        "total": np.median(m.raw_total, axis=0),
        "step": np.median(m.one_step, axis=0),
    }
    for layer, name in enumerate(m.layers):
        print(
            f"  {name:10s} |Δ| {med['delta'][layer]:.3e}   spread G {med['spread'][layer]:.3e}"
            f" ({med['relative'][layer]:.2e} of mean)   Σ raw {med['total'][layer]:.3e}"
            f"   one step {med['step'][layer]:.2e}"
        )
    print(
        f"  all layers: one step moves α by at most {m.one_step.max():.2e}; the run moved it by at most "
        f"{moved.max():.2e} in {m.round} rounds"
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[3], file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    with tempfile.TemporaryDirectory(prefix="pfedla-movement-") as work:
        report(measure(run_dir, Path(work)), run_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
