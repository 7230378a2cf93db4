"""Aggregation rules for client updates of the shared part, Byzantine-robust ones included.

Every rule takes one update per client (a dict of arrays with the same keys) and returns one
dict; clients count equally (robust rules are defined on the set of updates, not on sample
counts). Flower's implementations are reused where they fit (``flwr.server.strategy.aggregate``):

==================  ==========================================================================
``mean``            coordinate-wise mean
``median``          coordinate-wise median (Flower ``aggregate_median``)
``trimmed-mean``    per coordinate, drop the ``trim_fraction`` largest and smallest values, then
                    average (Flower ``aggregate_trimmed_avg``)
``krum``            the update with the smallest sum of squared distances to its n − f − 2
                    nearest neighbours (Blanchard et al. 2017; Flower ``aggregate_krum``)
``multi-krum``      the mean of the ``multi_krum_keep`` updates with the best Krum scores
``bulyan``          Krum selects n − 2f updates one by one, then per coordinate the mean of the
                    n − 4f values closest to the median (El Mhamdi et al. 2018; Flower
                    ``aggregate_bulyan``; needs n ≥ 4f + 3)
==================  ==========================================================================

``f`` (``num_byzantine``) is the number of attackers a rule is built to tolerate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.server.strategy.aggregate import (
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

AGGREGATORS = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan")
#: How a simulated attacker misbehaves (robustness experiments): the FFGG strategy chooses who
#: attacks and names the attack in its message config; the FFGG client carries it out.
ATTACKS = ("none", "sign-flip", "gaussian", "label-flip")


def attack_seed(seed: int, client_id: int, server_round: int) -> np.random.SeedSequence:
    """The seed of a simulated attacker's random draws in one round (the ``gaussian`` attack's
    noise): one stream per (run seed, client, round), so an attacker sends fresh noise every round
    and two attackers never send the same noise. ``np.random.default_rng`` takes it as is."""
    if min(seed, client_id, server_round) < 0:
        raise ValueError(f"attack seed parts must be >= 0, got {(seed, client_id, server_round)}")
    return np.random.SeedSequence([seed, client_id, server_round])


def robust_aggregate(
    name: str,
    updates: Sequence[Mapping[str, np.ndarray]],
    keys: Sequence[str],
    *,
    num_byzantine: int = 0,
    trim_fraction: float = 0.1,
    multi_krum_keep: int = 1,
) -> dict[str, np.ndarray]:
    """Aggregate ``updates`` (restricted to ``keys``) with rule ``name``; float64 result."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator '{name}'; one of {AGGREGATORS}")
    if not updates:
        raise ValueError("no updates to aggregate")
    keys = list(keys)
    n = len(updates)
    # Flower's functions take [(list of layers, num_examples)]; 1 per client = unweighted.
    results = [([np.asarray(u[k], dtype=np.float64) for k in keys], 1) for u in updates]
    if name == "mean":
        out = [np.mean([r[0][i] for r in results], axis=0) for i in range(len(keys))]
    elif name == "median":
        out = aggregate_median(results)
    elif name == "trimmed-mean":
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        out = aggregate_trimmed_avg(results, trim_fraction)
    elif name in ("krum", "multi-krum"):
        keep = 0 if name == "krum" else multi_krum_keep
        if name == "multi-krum" and not 1 <= keep <= n:
            raise ValueError(f"multi_krum_keep must be in [1, {n}], got {keep}")
        out = aggregate_krum(results, num_byzantine, keep)
    else:  # bulyan
        if n < 4 * num_byzantine + 3:
            raise ValueError(f"bulyan needs at least 4f + 3 = {4 * num_byzantine + 3} updates, got {n}")
        out = aggregate_bulyan(list(results), num_byzantine, aggregate_krum, to_keep=0)
    return {k: np.asarray(v, dtype=np.float64) for k, v in zip(keys, out, strict=True)}
