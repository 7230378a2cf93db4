"""FedSim / FedAlt server (Pillutla et al. 2022): the clients' mean change of the shared part
is a pseudo-gradient for a server optimizer.

Each round, with x the current shared parameters and x_i client i's shared parameters after
local training,

    Δ = Σ_i w_i (x_i − x),   w_i = b_i / Σ_j b_j,   b_i = the client's local batches (``num-steps``)

and the server takes one optimizer step along Δ (the negative pseudo-gradient):

* ``sgd``: m ← μ·m + Δ (m = Δ without momentum), x ← x + server_lr·m. With ``server_lr = 1`` and
  no momentum this is FedAvg of the client models weighted by their batches.
* ``adam``: m ← β1·m + (1−β1)·Δ, v ← β2·v + (1−β2)·Δ², x ← x + server_lr·m̂ / (√v̂ + eps) with the
  usual bias corrections m̂ = m / (1−β1^t), v̂ = v / (1−β2^t). Its steps are about ``server_lr``
  per coordinate, so it wants a small ``server_lr`` (1e-3 to 1e-2), unlike SGD's 1.

Options (``method.options``): ``server_opt: sgd`` (``sgd`` | ``adam``), ``server_lr: 1.0``,
``server_momentum: 0.0`` (SGD), ``beta1: 0.9``, ``beta2: 0.999``, ``eps: 1e-8`` (Adam).
The optimizer state (momentum / moments as float32, step count) is checkpointed with the run.
Which groups are private is ``method.private``, as for every method.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedvit.params import UpdateError
from fedvit.registry import option_error, register_strategy
from fedvit.wire import to_numpy, to_record
from strategies.base import PersonalizedStrategy
from strategies.rounds import ClientUpdate, RoundPlan, Sent


class ServerOptimizer(enum.StrEnum):
    sgd = "sgd"
    adam = "adam"


def pseudo_gradient(updates: list[ClientUpdate], current: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Δ = Σ w_i (x_i − x) in float64, clients weighted by their local batches (``num-steps``)."""
    steps = [float(u.metrics["num-steps"]) for u in updates]
    weights = [s / sum(steps) for s in steps]
    out = {}
    for k, x in current.items():
        x64 = x.astype(np.float64)
        out[k] = sum(w * (u.arrays[k] - x64) for w, u in zip(weights, updates, strict=True))
    return out


@register_strategy("server-opt")
class ServerOptStrategy(PersonalizedStrategy):
    """Server optimizer on the batch-weighted mean change of the shared part."""

    @dataclass
    class Options:
        server_opt: ServerOptimizer = ServerOptimizer.sgd
        server_lr: float = 1.0
        server_momentum: float = 0.0  # sgd only
        beta1: float = 0.9  # adam
        beta2: float = 0.999  # adam
        eps: float = 1e-8  # adam

        def __post_init__(self) -> None:
            self.server_opt = ServerOptimizer(self.server_opt)
            if not self.server_lr > 0:
                raise option_error("server_lr", f"must be > 0, got {self.server_lr}")
            for key in ("server_momentum", "beta1", "beta2"):
                if not 0 <= getattr(self, key) < 1:
                    raise option_error(key, f"must be in [0, 1), got {getattr(self, key)}")
            if not self.eps > 0:
                raise option_error("eps", f"must be > 0, got {self.eps}")

    def __init__(self, *, options: Options | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.options = options if options is not None else self.Options()
        self.step = 0  # server optimizer steps taken
        self.moments: dict[str, dict[str, np.ndarray]] = {"exp_avg": {}, "exp_avg_sq": {}}

    def check_update(self, update: ClientUpdate, sent: Sent) -> None:
        super().check_update(update, sent)
        steps = update.metrics.get("num-steps")
        if not isinstance(steps, int | float) or not steps > 0:
            raise UpdateError(f"client {update.client_id}: num-steps must be > 0, got {steps!r}")

    def aggregate_shared(self, plan: RoundPlan, updates: list[ClientUpdate]) -> ArrayRecord:
        """One optimizer step along Δ from the x the round started from."""
        x = to_numpy(plan.arrays)
        delta = pseudo_gradient(updates, x)
        self.step += 1
        return to_record({k: self._apply(k, x[k], d).astype(x[k].dtype) for k, d in delta.items()})

    def _apply(self, key: str, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        o, m, v = self.options, self.moments["exp_avg"], self.moments["exp_avg_sq"]
        x64 = x.astype(np.float64)
        if o.server_opt == ServerOptimizer.sgd:
            direction = delta
            if o.server_momentum > 0:
                direction = o.server_momentum * m.get(key, np.zeros_like(delta)) + delta
                m[key] = direction.astype(np.float32)
            return x64 + o.server_lr * direction
        m64 = o.beta1 * m.get(key, np.zeros_like(delta)) + (1 - o.beta1) * delta
        v64 = o.beta2 * v.get(key, np.zeros_like(delta)) + (1 - o.beta2) * delta**2
        m[key], v[key] = m64.astype(np.float32), v64.astype(np.float32)
        m_hat = m64 / (1 - o.beta1**self.step)
        v_hat = v64 / (1 - o.beta2**self.step)
        return x64 + o.server_lr * m_hat / (np.sqrt(v_hat) + o.eps)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"{name}.{k}": a for name, table in self.moments.items() for k, a in table.items()}
        return arrays, {"server_opt": self.options.server_opt.value, "step": self.step}

    def load_state_dict(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        saved = state.get("server_opt", self.options.server_opt.value)
        if saved != self.options.server_opt.value:
            raise ValueError(
                f"server.resume: the checkpoint's server optimizer is '{saved}', this run uses "
                f"'{self.options.server_opt.value}'"
            )
        self.step = int(state.get("step", 0))
        self.moments = {"exp_avg": {}, "exp_avg_sq": {}}
        for name, a in arrays.items():
            table, _, key = name.partition(".")
            if table not in self.moments or key not in self.shared_shapes:
                raise ValueError(f"server.resume: unexpected server optimizer state '{name}'")
            self.moments[table][key] = np.asarray(a, dtype=np.float32)
