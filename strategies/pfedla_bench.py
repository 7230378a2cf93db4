"""pFedLA's server-side cost: ``fedvit bench pfedla-memory`` (pFedLA's own subcommand: :func:`bench_command`).

For each N, a **fresh subprocess** builds pFedLA's server state for N clients
(the config's model, by default the tiny ViT on digits: N hypernetworks in memory, the N-model
store on disk in a temporary directory) and runs one round's server work for all N clients
without Flower: compute θ̄_i (as sent), recompute it and take HN_i's step from a synthetic
``Δ_i`` (Gaussian, std 1e-3), store θ_i ← θ̄_i − Δ_i, then garbage-collect the store. The child
reports its own peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which includes the
interpreter, torch and the model: ``rss_setup_mb`` is the peak before the pFedLA state exists)
and wall times.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedvit.cli.common import print_report
from fedvit.config import ConfigError
from fedvit.registry import register_command


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def pfedla_round(num_clients: int, overrides: str = "", seed: int = 0) -> dict[str, Any]:
    """One pFedLA server round for ``num_clients`` clients in this process (the child's work)."""
    import numpy as np

    from fedvit.config import load_config
    from fedvit.layeragg import LayerAggregation, aggregation_layers
    from fedvit.models import build_model
    from fedvit.params import ParameterSplit, get_arrays
    from fedvit.registry import method_options

    cfg = load_config({"method": "pfedla", "num-clients": num_clients, "overrides": overrides})
    options = method_options(cfg)[1]
    model = build_model(cfg)
    split = ParameterSplit.from_model(model, cfg.method.private)
    layers = aggregation_layers(model, split.shared, options.granularity)
    initial = get_arrays(model, split.shared)
    rss_setup = _maxrss_mb()
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="pfedla-bench-") as tmp:
        t0 = time.perf_counter()
        agg = LayerAggregation(
            layers,
            initial,
            num_clients,
            Path(tmp),
            embed_dim=options.embed_dim,
            hidden=options.hidden,
            n_layers=options.n_layers,
            hn_lr=options.hn_lr,
            hn_momentum=options.hn_momentum,
            hn_weight_decay=options.hn_weight_decay,
            heur_k=options.heur_k,
            seed=cfg.seed,
        )
        build_s = time.perf_counter() - t0
        versions = list(agg.store.versions)
        t0 = time.perf_counter()
        for i in range(num_clients):
            sent = agg.personalized_flat(i, versions)
            delta = rng.normal(0.0, 1e-3, size=sent.shape).astype(np.float32)
            agg.update(i, sent - delta, version=1, versions=versions)
        agg.store.commit()
        round_s = time.perf_counter() - t0
        store_bytes = agg.store.nbytes_on_disk()
    return {
        "clients": num_clients,
        "peak_rss_mb": round(_maxrss_mb(), 1),
        "rss_setup_mb": round(rss_setup, 1),
        "build_s": round(build_s, 3),
        "round_s": round(round_s, 3),
        "model_params": agg.store.size,
        "aggregation_layers": agg.num_layers,
        "hypernetwork_params": agg.hypernet_parameters(),
        "store_bytes_on_disk": store_bytes,
    }


def pfedla_memory(
    clients: Sequence[int], overrides: str = "", timeout: float | None = None
) -> dict[str, Any]:
    """Run :func:`pfedla_round` for each N in a fresh subprocess; the collected report."""
    rows = []
    for n in clients:
        proc = subprocess.run(
            [sys.executable, "-m", __name__, "--child", "pfedla-memory", str(n), overrides],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"bench pfedla-memory N={n} failed: {proc.stderr.strip()[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {
        "bench": "pfedla-memory",
        "overrides": overrides,
        "python": sys.version.split()[0],
        "results": rows,
    }


@register_command(
    "bench pfedla-memory",
    help="pFedLA's server memory and time for N clients (one fresh process each; JSON)",
)
def bench_command(argv: Sequence[str]) -> int:
    """``fedvit bench pfedla-memory [--clients N ...] [--overrides 'k=v ...'] [--out FILE]``."""
    p = argparse.ArgumentParser(
        prog="fedvit bench pfedla-memory",
        description="Build pFedLA's server state for N clients of the tiny ViT (digits defaults) and run "
        "one round's server work for all N (θ̄_i, an HN step from a synthetic Δ, θ_i stored) without "
        "Flower; report each child's peak RSS and times as JSON.",
    )
    p.add_argument("--clients", type=int, nargs="+", default=[20, 50, 100], metavar="N", help="sizes")
    p.add_argument("--overrides", default="", metavar="'k=v ...'", help="config overrides (dotted keys)")
    p.add_argument("--out", type=Path, metavar="FILE", help="also write the JSON report here")
    args = p.parse_args(list(argv))
    if any(n < 1 for n in args.clients):
        raise ConfigError("bench: --clients must be >= 1")
    return print_report(pfedla_memory(args.clients, overrides=args.overrides), args.out)


if __name__ == "__main__":  # the child: python -m strategies.pfedla_bench --child pfedla-memory N [OVERRIDES]
    if len(sys.argv) < 4 or sys.argv[1:3] != ["--child", "pfedla-memory"]:
        sys.exit(f"usage: python -m {__spec__.name} --child pfedla-memory N [OVERRIDES]")
    print(json.dumps(pfedla_round(int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "")), flush=True)
