"""FFGG server (Mishchenko et al. 2023): x ← x − γ · Agg(g_1 … g_n) on the shared part only.

What crosses the wire: ``train`` sends x (the shared split) and, to simulated attackers only,
``attack`` / ``attack-scale`` in the config; the reply holds one array per shared key: the
client's gradient in x (FFGG) or its local change ``x − x_local`` (Local FFGG,
``clients/ffgg.py``). Private parts y_i never reach the server, so aggregation cannot touch
them. ``Agg`` is any rule of :mod:`fedvit.robust` (mean, median, trimmed mean, Krum,
Multi-Krum, Bulyan); clients count equally.

Options (``method.options``): ``server_lr`` γ (1.0), ``aggregator`` (mean), ``num_byzantine``
f for Krum / Bulyan (default: the number of simulated attackers), ``trim_fraction`` (0.2),
``multi_krum_keep`` (0 = n − f), and the simulated attack: ``attack`` none | sign-flip |
gaussian | label-flip, ``attack_fraction`` (share of clients, chosen once with the seed),
``attack_scale``. The attackers are recorded in ``results.json`` (``attackers``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log

from fedvit.registry import method_options, option_error, register_strategy
from fedvit.robust import AGGREGATORS, ATTACKS, robust_aggregate
from fedvit.wire import to_numpy, to_record
from strategies.base import PersonalizedStrategy
from strategies.rounds import ClientUpdate, RoundPlan


@register_strategy("ffgg")
class FFGGStrategy(PersonalizedStrategy):
    """Gradient steps on the shared part with a pluggable (robust) aggregator."""

    dp_replies_are_updates = True  # a reply is the gradient (or local change) itself

    @classmethod
    def check_privacy(cls, cfg: Any) -> None:
        """``dp`` replaces the aggregator by the mean of clipped updates: only ``aggregator: mean``."""
        super().check_privacy(cfg)
        aggregator = method_options(cfg)[1].aggregator
        if aggregator != "mean":
            from fedvit.config import ConfigError

            raise ConfigError(
                f"method '{cfg.method.name}': dp.enabled needs method.options.aggregator 'mean', got "
                f"'{aggregator}' (its sensitivity to one client is not clip/m; the noise is calibrated "
                "for the mean)"
            )

    @dataclass
    class Options:
        server_lr: float = 1.0
        aggregator: str = "mean"
        num_byzantine: int | None = None  # None: the number of simulated attackers
        trim_fraction: float = 0.2
        multi_krum_keep: int = 0  # 0: n - f
        attack: str = "none"
        attack_fraction: float = 0.0
        attack_scale: float = 1.0

        def __post_init__(self) -> None:
            if not self.server_lr > 0:
                raise option_error("server_lr", f"must be > 0, got {self.server_lr}")
            if self.aggregator not in AGGREGATORS:
                raise option_error("aggregator", f"must be one of {AGGREGATORS}, got '{self.aggregator}'")
            if self.attack not in ATTACKS:
                raise option_error("attack", f"must be one of {ATTACKS}, got '{self.attack}'")
            if not 0 <= self.attack_fraction < 1:
                raise option_error("attack_fraction", f"must be in [0, 1), got {self.attack_fraction}")
            if not 0 <= self.trim_fraction < 0.5:
                raise option_error("trim_fraction", f"must be in [0, 0.5), got {self.trim_fraction}")
            if self.num_byzantine is not None and self.num_byzantine < 0:
                raise option_error("num_byzantine", f"must be >= 0, got {self.num_byzantine}")
            if self.multi_krum_keep < 0 or self.attack_scale < 0:
                raise option_error("multi_krum_keep", "multi_krum_keep and attack_scale must be >= 0")

    def __init__(self, *, options: Options | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.options = o = options if options is not None else self.Options()
        n_attackers = math.floor(o.attack_fraction * self.num_clients) if o.attack != "none" else 0
        rng = random.Random(self.seed * 31 + 7)
        self.attackers = sorted(rng.sample(range(self.num_clients), n_attackers))
        self.num_byzantine = o.num_byzantine if o.num_byzantine is not None else n_attackers
        if self.recorder is not None:
            self.recorder.data["attackers"] = self.attackers

    def summary(self) -> None:
        o = self.options
        log(
            INFO,
            "\t├──> FFGG: server_lr %s, aggregator %s (f=%d), attackers %s (%s)",
            o.server_lr,
            o.aggregator,
            self.num_byzantine,
            self.attackers,
            o.attack,
        )
        super().summary()

    def client_config(self, server_round: int, client_id: int, config: ConfigRecord) -> ConfigRecord:
        out = super().client_config(server_round, client_id, config)
        if client_id in self.attackers:
            out["attack"] = self.options.attack
            out["attack-scale"] = float(self.options.attack_scale)
        return out

    def aggregate_shared(self, plan: RoundPlan, updates: list[ClientUpdate]) -> ArrayRecord:
        """x ← x − γ · Agg(g_1 … g_n) from the x the round started from."""
        return to_record(self.robust_step(to_numpy(plan.arrays), [u.arrays for u in updates]))

    def robust_step(
        self, x: dict[str, np.ndarray], gradients: list[Mapping[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """One server step x ← x − γ · Agg(gradients) with the configured rule over x's keys
        (float64 arithmetic, x's dtype); Multi-Krum keeps ``multi_krum_keep`` or n − f."""
        o = self.options
        keep = o.multi_krum_keep or max(1, len(gradients) - self.num_byzantine)
        g = robust_aggregate(
            o.aggregator,
            gradients,
            list(x),
            num_byzantine=self.num_byzantine,
            trim_fraction=o.trim_fraction,
            multi_krum_keep=min(keep, len(gradients)),
        )
        return {k: (v.astype(np.float64) - o.server_lr * g[k]).astype(v.dtype) for k, v in x.items()}
