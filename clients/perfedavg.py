"""Per-FedAvg (Fallah, Mokhtari & Ozdaglar 2020, "Personalized Federated Learning with
Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach").

Everything is shared (``private: []``); the server is FedAvg. Local training is MAML-style.
Each local step draws fresh batches ``D``, ``D'`` (and ``D''`` for HF) from the client's
train split and updates the model ``θ`` with the meta-gradient ``g``:

* ``θ' = θ − α ∇L_D(θ)`` (``α`` = ``inner_lr``; a plain gradient step),
* **FO** (first order, ``variant: fo``): ``g = ∇L_{D'}(θ')``,
* **HF** (Hessian-free, ``variant: hf``): ``g = (I − α H_{D''}(θ)) ∇L_{D'}(θ')``, with the
  Hessian-vector product ``H_{D''}(θ) u`` estimated, as in the paper, by central finite
  differences ``[∇L_{D''}(θ + δu) − ∇L_{D''}(θ − δu)] / (2δ)`` (``hvp: finite_difference``,
  ``δ`` = ``hf_delta``; two extra gradient evaluations, works with any attention kernel), or
  exactly by autograd double-backward (``hvp: autograd``; runs attention with the math SDPA
  kernel, the fused ones have no double backward; slower and more memory),
* ``θ ← θ − β g``: ``g`` is applied through ``train.optimizer`` with lr ``β`` = ``outer_lr``
  (default ``train.lr``), after ``train.grad_clip``. With ``train.optimizer=sgd``,
  ``train.momentum=0`` and ``train.weight_decay=0`` this is exactly the paper's update.

A local step consumes 2 (FO) or 3 (HF) batches (cycling the loader); the number of steps is
``train.local_steps``, else enough for ``train.local_epochs`` passes over the data. Training
runs in float32 (no AMP).

Evaluation: from the received shared model each client takes ``eval_adapt_steps`` plain
gradient steps with lr ``α`` on batches of its own train split, then tests. The adapted copy
exists only inside that evaluation message: nothing is stored and the reply has no arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from clients.base import PartialClient
from fedvit.registry import option_error, register_client
from fedvit.training import TrainingError, TrainResult, count_steps, cycle, make_loader, make_optimizer

Params = dict[str, torch.Tensor]
LossFn = Callable[[Params, Any], torch.Tensor]


class Variant(Enum):
    fo = "fo"
    hf = "hf"


class HVP(Enum):
    finite_difference = "finite_difference"
    autograd = "autograd"


def _grad(loss_fn: LossFn, params: Params, batch: Any, *, create_graph: bool = False) -> tuple[Params, float]:
    leaves = {k: p if create_graph else p.detach().requires_grad_(True) for k, p in params.items()}
    loss = loss_fn(leaves, batch)
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph)
    return dict(zip(leaves, grads, strict=True)), loss.item()


def hessian_vector_product(
    loss_fn: LossFn, params: Params, batch: Any, u: Params, *, method: HVP, delta: float = 1e-3
) -> Params:
    """``H_batch(params) u``: exact (autograd double-backward) or by central finite differences."""
    if method is HVP.autograd:
        # The fused attention kernels have no double backward: use the math one here.
        with sdpa_kernel(SDPBackend.MATH):
            leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
            grads, _ = _grad(loss_fn, leaves, batch, create_graph=True)
            hv = torch.autograd.grad(
                list(grads.values()), list(leaves.values()), grad_outputs=[u[k] for k in leaves]
            )
        return dict(zip(leaves, hv, strict=True))
    plus, _ = _grad(loss_fn, {k: p.detach() + delta * u[k] for k, p in params.items()}, batch)
    minus, _ = _grad(loss_fn, {k: p.detach() - delta * u[k] for k, p in params.items()}, batch)
    return {k: (plus[k] - minus[k]) / (2 * delta) for k in params}


def meta_gradient(
    loss_fn: LossFn,
    params: Params,
    batches: Sequence[Any],
    *,
    inner_lr: float,
    variant: Variant,
    hvp: HVP = HVP.finite_difference,
    delta: float = 1e-3,
) -> tuple[Params, float]:
    """Per-FedAvg's ``g`` at ``params`` from ``batches`` = (D, D') for FO or (D, D', D'') for HF.

    Returns (g, L_{D'}(θ'))."""
    inner, _ = _grad(loss_fn, params, batches[0])
    adapted = {k: p.detach() - inner_lr * inner[k] for k, p in params.items()}
    outer, outer_loss = _grad(loss_fn, adapted, batches[1])
    if variant is Variant.fo:
        return outer, outer_loss
    hv = hessian_vector_product(loss_fn, params, batches[2], outer, method=hvp, delta=delta)
    return {k: outer[k] - inner_lr * hv[k] for k in params}, outer_loss


def model_loss_fn(model: nn.Module, loss: nn.Module | None = None) -> LossFn:
    """``loss_fn(params, (x, y))`` for ``model`` evaluated at ``params`` (buffers as they are)."""
    loss = loss or nn.CrossEntropyLoss()
    buffers = dict(model.named_buffers())

    def fn(params: Params, batch: Any) -> torch.Tensor:
        x, y = batch
        logits = functional_call(model, {**params, **buffers}, (x,))
        fn.outputs.append((logits.detach(), y))  # type: ignore[attr-defined]
        return loss(logits, y)

    fn.outputs = []  # type: ignore[attr-defined]  # (logits, labels) of every call, in order
    return fn


def perfedavg_step(
    model: nn.Module,
    batches: Sequence[Any],
    optimizer: torch.optim.Optimizer,
    *,
    inner_lr: float,
    variant: Variant,
    hvp: HVP = HVP.finite_difference,
    delta: float = 1e-3,
    grad_clip: float | None = None,
) -> tuple[float, int]:
    """One local Per-FedAvg step on ``model`` in place: ``θ ← optimizer step with g``.

    Returns L_{D'}(θ') and the number of examples of D' that θ' classifies correctly."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    loss_fn = model_loss_fn(model)
    g, loss = meta_gradient(
        loss_fn, params, batches, inner_lr=inner_lr, variant=variant, hvp=hvp, delta=delta
    )
    if not math.isfinite(loss):
        raise TrainingError(f"Per-FedAvg loss is {loss}: lower method.options.inner_lr / train.lr")
    optimizer.zero_grad(set_to_none=True)
    for k, p in params.items():
        p.grad = g[k].detach().clone()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(list(params.values()), grad_clip)
    optimizer.step()
    logits, y = loss_fn.outputs[1]  # type: ignore[attr-defined]  # θ' on D'
    return loss, int((logits.argmax(dim=1) == y).sum().item())


@register_client("perfedavg")
class PerFedAvgClient(PartialClient):
    """MAML-style local training (FO or HF); evaluation after a few local adaptation steps."""

    @dataclass
    class Options:
        variant: Variant = Variant.fo  # fo | hf
        inner_lr: float = 0.01  # α: the adaptation step (training and evaluation)
        outer_lr: float | None = None  # β: the meta step; None = train.lr
        hvp: HVP = HVP.finite_difference  # HF only: finite_difference | autograd
        hf_delta: float = 1e-3  # HF with finite differences: δ
        eval_adapt_steps: int = 1  # adaptation steps before each evaluation

        def __post_init__(self) -> None:
            for key in ("inner_lr", "hf_delta"):
                if not getattr(self, key) > 0:
                    raise option_error(key, f"must be > 0, got {getattr(self, key)}")
            if self.outer_lr is not None and not self.outer_lr > 0:
                raise option_error("outer_lr", f"must be > 0, got {self.outer_lr}")
            if self.eval_adapt_steps < 0:
                raise option_error("eval_adapt_steps", f"must be >= 0, got {self.eval_adapt_steps}")

    def batches_per_step(self) -> int:
        return 3 if self.options.variant is Variant.hf else 2

    def local_train(self, server_round: int) -> TrainResult:
        tc, opts = self.cfg.train, self.options
        loader = self.train_loader(server_round)
        per_step = self.batches_per_step()
        steps = count_steps(tc, loader, per_step)
        model = self.model.to(self.device).train()
        outer_tc = dataclasses.replace(tc, lr=opts.outer_lr if opts.outer_lr is not None else tc.lr)
        optimizer = make_optimizer(model.parameters(), outer_tc)
        batches = cycle(loader)
        total, correct, seen = 0.0, 0, 0
        for _ in range(steps):
            step_batches = [tuple(t.to(self.device) for t in next(batches)) for _ in range(per_step)]
            loss, right = perfedavg_step(
                model, step_batches, optimizer,
                inner_lr=opts.inner_lr, variant=opts.variant, hvp=opts.hvp,
                delta=opts.hf_delta, grad_clip=tc.grad_clip,
            )  # fmt: skip
            n = len(step_batches[1][1])
            total, correct, seen = total + loss * n, correct + right, seen + n
        # train loss / accuracy: of the adapted θ' on D' (the meta-objective), before each meta step
        return TrainResult(loss=total / seen, accuracy=correct / seen, num_examples=seen, num_steps=steps)

    def personalize_for_eval(self, server_round: int) -> None:
        """``eval_adapt_steps`` plain SGD steps with lr ``inner_lr`` on local train batches."""
        steps = self.options.eval_adapt_steps
        if steps == 0 or len(self.data.train) == 0:
            return
        seed = self.cfg.seed * 1_000_003 + server_round * 10_007 + self.client_id + 7_919
        loader = make_loader(self.data.train, self.cfg.train.batch_size, shuffle=True, seed=seed)
        adapt(self.model, cycle(loader), steps, self.options.inner_lr, self.device)


def adapt(model: nn.Module, batches: Iterator[Any], steps: int, lr: float, device: torch.device) -> None:
    """``steps`` plain gradient steps ``θ ← θ − lr ∇L_batch(θ)`` on ``model`` in place."""
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        x, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x.to(device)), y.to(device)).backward()
        optimizer.step()
