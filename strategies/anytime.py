"""Anytime / anywhere server (Liu et al. 2022; see :mod:`fedvit.models.anytime`): device tiers.

Client ``i`` has a maximum depth (its tier): what it reported when it identified itself (its
SuperNode's ``--node-config max-depth=k``, else ``model.anytime.tiers[i % len]``, else the full
depth; see :func:`clients.anytime.device_tier`). It receives, trains and sends only the
adapters of exits ``<= tier`` and the other shared parameters (the shared exit head); the
frozen backbone is never sent (``method.private``).
:meth:`aggregate_shared` averages each parameter over the clients that hold it (sample-weighted);
a parameter that no client of the round holds keeps its value. ``results.json`` ``resources``
gains the parameters sent per round at each possible tier and per-exit forward FLOPs; each
client's evaluation gains its accuracy at compute budgets (:meth:`client_eval_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from fedvit.evaluation import flops_per_sample
from fedvit.models.anytime import AnytimeViT, client_tier, keys_up_to
from fedvit.params import UpdateError, count, parameter_groups
from fedvit.registry import option_error, register_strategy
from fedvit.wire import to_numpy, to_record
from strategies.base import PersonalizedStrategy
from strategies.rounds import ClientUpdate, Payload, RoundPlan, Sent, weighted_mean


@register_strategy("anytime")
class AnytimeStrategy(PersonalizedStrategy):
    """FedAvg of each shared parameter over the clients (tiers) that hold it; accuracy at
    compute budgets from the per-exit accuracies."""

    dp_refusal = (
        "each parameter is averaged over the clients whose tier holds it, a different number of "
        "clients (so a different noise scale) per parameter"
    )

    @dataclass
    class Options:
        #: per-sample compute budgets (MFLOPs) to report accuracy at; []: each exit's cost
        budgets_mflops: list[float] = field(default_factory=list)

        def __post_init__(self) -> None:
            self.budgets_mflops = [float(b) for b in self.budgets_mflops]
            if not all(b > 0 and math.isfinite(b) for b in self.budgets_mflops):
                raise option_error("budgets_mflops", f"must be positive MFLOPs, got {self.budgets_mflops}")

    def __init__(
        self,
        *,
        tiers: Sequence[int] = (),
        full_depth: int,
        exit_flops: dict[int, float] | None = None,
        resources: dict[str, float] | None = None,
        options: Options | None = None,
        **kw,
    ) -> None:
        """``exit_flops``: forward FLOPs per sample up to each exit (the compute budgets);
        ``resources``: the rest of what ``results.json`` reports about the model."""
        super().__init__(**kw)
        self.tiers = tuple(int(t) for t in tiers)
        self.full_depth = full_depth
        self.exit_flops = {int(d): float(f) for d, f in (exit_flops or {}).items()}
        self._resources = dict(resources or {})
        self._resources.update({f"flops_per_sample_exit{d}": f for d, f in self.exit_flops.items()})
        self.options = options or self.Options()

    @classmethod
    def from_config(cls, cfg, *, model, split, **kwargs: Any):
        if not isinstance(model, AnytimeViT):
            raise ValueError("strategy 'anytime' needs model.anytime.enabled=true")
        from fedvit.models import example_input

        tiers, full = list(cfg.model.anytime.tiers), model.exit_depths[-1]
        shared = split.shapes(model, "shared")
        resources: dict[str, float] = {
            "params_backbone": count(
                {k: tuple(model.state_dict()[k].shape) for k in parameter_groups(model)["backbone"]}
            )
        }
        for depth in model.exit_depths:  # a device may declare any exit as its tier
            sent = count({k: shared[k] for k in keys_up_to(list(shared), depth)})
            resources[f"params_sent_up_per_round_tier{depth}"] = sent
            resources[f"bytes_sent_up_per_round_tier{depth}"] = 4 * sent
        exit_flops: dict[int, float] = {}
        saved = model.max_depth
        try:
            for depth in model.exit_depths:
                model.max_depth = depth
                exit_flops[depth] = flops_per_sample(model, example_input(cfg))
        finally:
            model.max_depth = saved
        extra = {"tiers": tiers, "full_depth": full, "exit_flops": exit_flops, "resources": resources}
        return super().from_config(cfg, model=model, split=split, **extra, **kwargs)

    def tier(self, client_id: int) -> int:
        """The tier the client reported when it identified itself (its node config's
        ``max-depth`` or ``model.anytime.tiers``); the configured one before that."""
        reported = self.client_info.get(client_id, {}).get("tier")
        return int(reported) if reported is not None else client_tier(self.tiers, client_id, self.full_depth)

    def held_keys(self, client_id: int) -> tuple[str, ...]:
        """The shared keys client ``client_id`` receives and sends."""
        return keys_up_to(list(self.shared_shapes), self.tier(client_id))

    # ------------------------------------------------------------------ hooks

    def train_arrays(self, server_round: int, client_id: int, arrays: ArrayRecord) -> Payload:
        """The shared arrays of the client's tier (a subset of the checkpoint's, so exportable);
        its reply must carry exactly these."""
        held = set(self.held_keys(client_id))
        return Payload(ArrayRecord({k: v for k, v in arrays.items() if k in held}))

    def client_config(self, server_round: int, client_id: int, config: ConfigRecord) -> ConfigRecord:
        out = super().client_config(server_round, client_id, config)
        out["tier"] = self.tier(client_id)
        return out

    def sender(self, update: ClientUpdate) -> str:
        return f"client {update.client_id} (tier {self.tier(update.client_id)})"

    def aggregate_shared(self, plan: RoundPlan, updates: list[ClientUpdate]) -> ArrayRecord:
        """Per parameter, the sample-weighted mean over the updates that hold it."""
        old = to_numpy(plan.arrays)
        out: dict[str, np.ndarray] = {}
        for k in self.shared_shapes:
            holders = [u for u in updates if k in u.arrays]
            if holders:
                out[k] = weighted_mean(holders, [k])[k]
            elif k in old:
                out[k] = old[k]
            else:
                raise UpdateError(f"no client holds '{k}' and there is no current value")
        return to_record(out)

    def budgets(self) -> dict[str, float]:
        """Metric suffix -> FLOPs per sample: ``budget-exit<d>`` at each exit's cost, or
        ``budget-<B>M`` for each of ``options.budgets_mflops``."""
        if self.options.budgets_mflops:
            return {f"budget-{b:g}M": b * 1e6 for b in self.options.budgets_mflops}
        return {f"budget-exit{d}": f for d, f in sorted(self.exit_flops.items())}

    def client_eval_metrics(
        self, client_id: int, metrics: dict[str, Any], sent: Sent | None
    ) -> dict[str, Any]:
        """Adds ``test-acc-<budget>`` for every budget: the accuracy of the deepest exit the
        client has (its tier) that costs at most the budget per sample; 0 when even its first
        exit costs more (no answer in budget)."""
        out = dict(metrics)
        exits = sorted(int(k.removeprefix("test-acc-exit")) for k in metrics if k.startswith("test-acc-exit"))
        for name, flops in self.budgets().items():
            within = [d for d in exits if self.exit_flops.get(d, math.inf) <= flops * (1 + 1e-9)]
            out[f"test-acc-{name}"] = float(metrics[f"test-acc-exit{within[-1]}"]) if within else 0.0
        return out

    def server_resources(self) -> dict[str, float]:
        return dict(self._resources)
