"""APFL (Deng, Kamani & Mahdavi 2020, "Adaptive Personalized Federated Learning").

Every parameter of the ViT is shared (``private: []``): the server averages the shared model
``w`` exactly as FedAvg does. Each client additionally keeps, in its private store (never
sent):

* ``apfl.v.<state-dict key>``: its private model ``v_i`` (same architecture; it starts as a
  copy of the seeded initial model),
* ``apfl.alpha``: its mixing weight ``α_i`` (shape ``(1,)``).

The personalized prediction mixes the two models' **outputs (logits)**:
``α_i·v_i(x) + (1−α_i)·w(x)``, as the reimplementations in fl4health (``ApflModule``) and
FL-bench do. (The paper's Algorithm 1 mixes *parameters*, ``v̄ = α v + (1−α) w``; with
logits the two models never need to be combined weight by weight.)

One local step on a batch ``(x, y)`` (both models step from the same iterate, as in the
paper's Algorithm 1):

* ``w`` takes an optimizer step on its own loss ``L(w(x), y)``;
* ``v_i`` takes an optimizer step on the mixed loss ``L(α v_i(x) + (1−α) w(x), y)`` (``w``'s
  output detached, so only ``v_i`` and ``α`` receive this gradient);
* with ``adaptive_alpha``, ``α ← clip(α − alpha_lr · ∂L_mixed/∂α, 0, 1)``, where
  ``∂L_mixed/∂α = ⟨∂L/∂z, v_i(x) − w(x)⟩``.

``variant: pfllib`` runs APFL as the FedPerfix authors' code does (their
``system/flcore/clients/clientapfl.py``, from PFLlib) instead: ``w`` and ``v_i`` each step on
their own loss; ``α ← clip(α − alpha_lr·(⟨v_i − w, α∇v_i + (1−α)∇w⟩ + 0.02 α), 0, 1)`` over all
parameters (after the step, with that step's gradients); after local training ``v_i`` becomes
the parameter mixture ``(1−α) w + α v_i`` of the two locally trained models, and evaluation
predicts with ``v_i`` alone (the received ``w`` is not used: a client that did not train is
evaluated on its mixture from its last round).

Both models use ``train.optimizer`` / ``train.lr`` (one optimizer each) and ``train.grad_clip``
(per model); training runs in float32 (no AMP). By default evaluation predicts with the mix of the
latest aggregated ``w`` and the client's ``v_i`` and ``α_i``. Only ``w`` is ever sent, with
the base client's training metrics (``REPLY_METRICS``): ``α_i`` is not one of them; it is read
from the client's store (``apfl.alpha``).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from clients.base import ClientSetup, PartialClient
from fedvit.params import get_arrays, set_arrays
from fedvit.registry import method_options, option_error, register_client
from fedvit.training import (
    EvalResult,
    Tally,
    TrainingError,
    TrainResult,
    count_steps,
    cycle,
    evaluate,
    make_loader,
    make_optimizer,
)

if TYPE_CHECKING:
    from fedvit.config import FedvitConfig

V_PREFIX = "apfl.v."
ALPHA_KEY = "apfl.alpha"


class AlphaMix(nn.Module):
    """The personalized predictor: ``alpha * private(x) + (1 - alpha) * shared(x)`` on logits."""

    def __init__(self, shared: nn.Module, private: nn.Module, alpha: float) -> None:
        super().__init__()
        self.shared = shared
        self.private = private
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.private(x) + (1.0 - self.alpha) * self.shared(x)


def apfl_step(
    w: nn.Module,
    v: nn.Module,
    alpha: float,
    x: torch.Tensor,
    y: torch.Tensor,
    opt_w: torch.optim.Optimizer,
    opt_v: torch.optim.Optimizer,
    *,
    adaptive: bool,
    alpha_lr: float,
    grad_clip: float | None = None,
    loss_fn: nn.Module | None = None,
) -> tuple[float, float, torch.Tensor]:
    """One APFL local step; returns (new alpha, mixed loss, mixed logits (detached))."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    opt_w.zero_grad(set_to_none=True)
    opt_v.zero_grad(set_to_none=True)
    out_w = w(x)
    loss_w = loss_fn(out_w, y)
    a = torch.tensor(alpha, dtype=out_w.dtype, device=out_w.device, requires_grad=adaptive)
    mixed = a * v(x) + (1 - a) * out_w.detach()
    loss_mix = loss_fn(mixed, y)
    for name, loss in (("shared", loss_w), ("mixed", loss_mix)):
        if not math.isfinite(loss.item()):
            raise TrainingError(f"APFL {name} loss is {loss.item()}: lower train.lr or check the data")
    loss_w.backward()
    loss_mix.backward()
    if grad_clip is not None:
        for model in (w, v):
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    opt_w.step()
    opt_v.step()
    if adaptive:
        alpha = min(1.0, max(0.0, alpha - alpha_lr * float(a.grad)))
    return alpha, loss_mix.item(), mixed.detach()


def pfllib_step(
    w: nn.Module,
    v: nn.Module,
    alpha: float,
    x: torch.Tensor,
    y: torch.Tensor,
    opt_w: torch.optim.Optimizer,
    opt_v: torch.optim.Optimizer,
    *,
    adaptive: bool,
    alpha_lr: float,
    grad_clip: float | None = None,
    loss_fn: nn.Module | None = None,
) -> tuple[float, float, torch.Tensor]:
    """One local step of APFL as PFLlib (and the FedPerfix authors' code) runs it: ``w`` and ``v``
    each take a step on their own loss, then ``α`` moves along
    ``⟨v − w, α∇v + (1−α)∇w⟩ + 0.02 α`` (parameters after the step, that step's gradients).
    Returns (new alpha, v's loss, v's logits (detached))."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    losses, out_v = {}, None
    for name, model, opt in (("shared", w, opt_w), ("private", v, opt_v)):
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y)
        if not math.isfinite(loss.item()):
            raise TrainingError(f"APFL {name} loss is {loss.item()}: lower train.lr or check the data")
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        opt.step()
        losses[name], out_v = loss.item(), out
    if adaptive:
        grad = 0.02 * alpha
        with torch.no_grad():
            for pw, pv in zip(w.parameters(), v.parameters(), strict=True):
                if pw.grad is not None and pv.grad is not None:
                    grad += float(((pv - pw) * (alpha * pv.grad + (1 - alpha) * pw.grad)).sum())
        alpha = min(1.0, max(0.0, alpha - alpha_lr * grad))
    return alpha, losses["private"], out_v.detach()


def mix_parameters(w: nn.Module, v: nn.Module, alpha: float) -> None:
    """``v ← (1−α) w + α v``, parameter by parameter (PFLlib's APFL after local training)."""
    with torch.no_grad():
        for pw, pv in zip(w.parameters(), v.parameters(), strict=True):
            pv.mul_(alpha).add_(pw, alpha=1.0 - alpha)


VARIANTS = ("logit-mix", "pfllib")


@register_client("apfl")
class APFLClient(PartialClient):
    """Trains the shared model ``w`` and a private model ``v_i`` mixed by ``α_i``; sends only ``w``."""

    @dataclass
    class Options:
        alpha: float = 0.25  # initial mixing weight α_i (of the private model)
        adaptive_alpha: bool = True  # learn α_i by projected gradient descent on the mixed loss
        alpha_lr: float = 0.01  # step size of α_i's update
        variant: str = "logit-mix"  # logit-mix | pfllib (the FedPerfix authors' code; module docstring)

        def __post_init__(self) -> None:
            if self.variant not in VARIANTS:
                raise option_error("variant", f"must be one of {VARIANTS}, got '{self.variant}'")
            if not 0.0 <= self.alpha <= 1.0:
                raise option_error("alpha", f"must be in [0, 1], got {self.alpha}")
            if self.alpha_lr < 0:
                raise option_error("alpha_lr", f"must be >= 0, got {self.alpha_lr}")

    def __init__(self, setup: ClientSetup) -> None:
        # Before the base class restores the private state: v_i starts as a copy of the seeded
        # initial model (the adapter builds it fresh for each message; a stored v_i replaces it).
        self.private_model = copy.deepcopy(setup.model)
        self.alpha = float(method_options(setup.cfg)[0].alpha)
        super().__init__(setup)

    # ------------------------------------------------------------------ private state

    def _v_keys(self) -> list[str]:
        return list(self.private_model.state_dict().keys())

    def private_state_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = dict(super().private_state_shapes())
        sd = self.private_model.state_dict()
        shapes.update({V_PREFIX + k: tuple(sd[k].shape) for k in self._v_keys()})
        shapes[ALPHA_KEY] = (1,)
        return shapes

    def private_state(self) -> dict[str, np.ndarray]:
        state = dict(super().private_state())
        state.update({V_PREFIX + k: a for k, a in get_arrays(self.private_model, self._v_keys()).items()})
        state[ALPHA_KEY] = np.array([self.alpha], dtype=np.float64)
        return state

    def restore_private_state(self, arrays: dict[str, np.ndarray]) -> None:
        base = {k: a for k, a in arrays.items() if not k.startswith(V_PREFIX) and k != ALPHA_KEY}
        super().restore_private_state(base)
        set_arrays(
            self.private_model, {k[len(V_PREFIX) :]: a for k, a in arrays.items() if k.startswith(V_PREFIX)}
        )
        if ALPHA_KEY in arrays:
            self.alpha = float(np.asarray(arrays[ALPHA_KEY]).reshape(-1)[0])

    @staticmethod
    def adjust_resources(
        resources: dict[str, float], model: nn.Module, cfg: FedvitConfig
    ) -> dict[str, float]:
        """APFL's real footprint from the split-based counts of
        :func:`fedvit.evaluation.resource_counts`: each client also stores ``v_i`` (a whole model)
        and ``α_i``, and a prediction runs both models (``pfllib``: ``v_i`` alone)."""
        extra = sum(t.numel() for t in model.state_dict().values()) + 1
        out = dict(resources)
        out["params_stored_per_client"] += extra
        out["params_private_per_client"] += extra
        if method_options(cfg)[0].variant != "pfllib":
            out["flops_per_sample"] *= 2
        return out

    # ------------------------------------------------------------------ training / evaluation

    def mixture(self) -> nn.Module:
        """The personalized predictor: ``α_i·v_i + (1−α_i)·w`` on logits, or (``pfllib``) ``v_i``,
        the parameter mixture made after the client's last local training."""
        if self.options.variant == "pfllib":
            return self.private_model
        return AlphaMix(self.model, self.private_model, self.alpha)

    def local_train(self, server_round: int) -> TrainResult:
        tc, opts = self.cfg.train, self.options
        loader = self.train_loader(server_round)
        steps = count_steps(tc, loader)
        w = self.model.to(self.device).train()
        v = self.private_model.to(self.device).train()
        opt_w = make_optimizer(w.parameters(), tc)
        opt_v = make_optimizer(v.parameters(), tc)
        tally = Tally()
        step = pfllib_step if opts.variant == "pfllib" else apfl_step
        for x, y in itertools.islice(cycle(loader), steps):
            x, y = x.to(self.device), y.to(self.device)
            self.alpha, loss, logits = step(
                w, v, self.alpha, x, y, opt_w, opt_v,
                adaptive=opts.adaptive_alpha, alpha_lr=opts.alpha_lr, grad_clip=tc.grad_clip,
            )  # fmt: skip
            tally.add(loss, logits, y)
        if opts.variant == "pfllib":
            mix_parameters(w, v, self.alpha)
        return tally.result(steps)

    def _eval(self, dataset) -> EvalResult:
        loader = make_loader(
            dataset, self.cfg.train.eval_batch_size, shuffle=False, workers=self.cfg.data.num_workers
        )
        return evaluate(self.mixture(), loader, self.device)
