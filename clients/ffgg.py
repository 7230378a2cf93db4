"""FFGG ("fine-tuning followed by global gradient", Mishchenko, Islamov, Gorbunov, Horváth 2023),
client side; the server is ``strategies/ffgg.py``.

Variables split into global x (the shared split) and local y_i (``method.private``). Each round
client i

1. fine-tunes y_i for τ = ``private_steps`` local steps with x frozen, starting from its
   previous y_i (kept at home like every private part);
2. **FFGG** (``global_steps: 0``): computes the gradient of its training loss in x at (x, y_i),
   averaged over ``grad_batches`` batches (``null``: one full pass over its training split),
   and sends it; **Local FFGG** (``global_steps > 0``): takes that many local steps on x with
   y_i frozen and sends the change ``x − x_local`` as a pseudo-gradient.

What crosses the wire: the server sends x; the reply holds one array per shared key (a
gradient or a pseudo-gradient, never weights), ``num-examples`` and ``num-steps``; y_i never
leaves. The local solver is ``train.optimizer`` / ``train.lr`` / ``train.batch_size``;
``private_unit`` / ``global_unit`` say whether the step counts are optimizer steps or epochs.

Simulated attackers (robustness experiments): a client whose message config carries
``attack`` behaves as told — ``sign-flip`` sends ``−attack-scale × g``, ``gaussian`` sends
Gaussian noise of std ``attack-scale`` instead of g, ``label-flip`` trains and computes g on
labels ``C − 1 − y``. The strategy decides who attacks (``strategies/ffgg.py``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from clients.base import PartialClient, trainable_only
from fedvit.params import get_arrays, set_arrays
from fedvit.registry import option_error, register_client
from fedvit.robust import ATTACKS, attack_seed
from fedvit.training import TrainResult, cycle, train_local

UNITS = ("steps", "epochs")


class FlippedLabels(nn.Module):
    """Cross-entropy against ``C − 1 − y`` (a label-flipping attacker's objective)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, self.num_classes - 1 - y)


@dataclass(frozen=True)
class Attack:
    """How this round's reply misbehaves (a simulated attacker), from the message config:
    ``attack`` (one of :data:`fedvit.robust.ATTACKS`) and ``attack-scale``."""

    name: str = "none"
    scale: float = 1.0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Attack:
        name = str(config.get("attack", "none"))
        if name not in ATTACKS:
            raise ValueError(f"unknown attack '{name}'; one of {ATTACKS}")
        return cls(name, float(config.get("attack-scale", 1.0)))

    def loss_fn(self, num_classes: int) -> nn.Module:
        """The training objective: flipped labels for ``label-flip``, else cross-entropy."""
        return FlippedLabels(num_classes) if self.name == "label-flip" else nn.CrossEntropyLoss()

    def distort(self, update: dict[str, np.ndarray], seed: np.random.SeedSequence) -> dict[str, np.ndarray]:
        """What is sent instead of ``update``: ``−scale × update`` (sign-flip), Gaussian noise of
        std ``scale`` (gaussian, drawn with ``seed``: :func:`fedvit.robust.attack_seed`), else ``update``."""
        if self.name == "sign-flip":
            return {k: -self.scale * v for k, v in update.items()}
        if self.name == "gaussian":
            rng = np.random.default_rng(seed)
            return {k: rng.normal(0.0, self.scale, v.shape).astype(v.dtype) for k, v in update.items()}
        return update


@register_client("ffgg")
class FFGGClient(PartialClient):
    """Fine-tune the private part, then send the gradient (or local change) of the shared part."""

    @dataclass
    class Options:
        private_steps: int = 10  # τ
        private_unit: str = "steps"  # steps | epochs
        global_steps: int = 0  # 0: FFGG (one gradient); > 0: Local FFGG
        global_unit: str = "steps"
        grad_batches: int | None = None  # None: a full pass over the training split

        def __post_init__(self) -> None:
            for key in ("private_steps", "global_steps"):
                if getattr(self, key) < 0:
                    raise option_error(key, f"must be >= 0, got {getattr(self, key)}")
            for key in ("private_unit", "global_unit"):
                if getattr(self, key) not in UNITS:
                    raise option_error(key, f"must be one of {UNITS}, got '{getattr(self, key)}'")
            if self.grad_batches is not None and self.grad_batches < 1:
                raise option_error("grad_batches", f"must be >= 1 (or null), got {self.grad_batches}")

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        """Load x, fine-tune y_i, compute the (attacked, if told) update of x, save y_i and send
        the update (never x itself). The attack and the update are values of this call."""
        attack = Attack.from_config(config)
        self.set_parameters(parameters)
        result, update = self.local_update(int(config.get("server-round", 0)), attack)
        self.save_private()
        metrics = {"train-loss": result.loss, "train-acc": result.accuracy, "num-steps": result.num_steps}
        return [update[k].astype(np.float32) for k in self.split.shared], len(self.data.train), metrics

    def _length(self, count: int, unit: str) -> dict[str, int]:
        return {"steps": count} if unit == "steps" else {"epochs": count}

    def local_update(self, server_round: int, attack: Attack) -> tuple[TrainResult, dict[str, np.ndarray]]:
        """τ private steps with x frozen, then the gradient in x (FFGG) or the change of x after
        ``global_steps`` local steps (Local FFGG), as ``attack`` distorts it; x is left as received."""
        o, tc = self.options, self.cfg.train
        loader = self.train_loader(server_round)
        loss_fn = attack.loss_fn(self.cfg.data.num_classes)
        results: list[TrainResult] = []
        x0 = get_arrays(self.model, self.split.shared)
        if o.private_steps > 0 and self.split.private:
            with trainable_only(self.model, self.split.private) as params:
                length = self._length(o.private_steps, o.private_unit)
                results.append(
                    train_local(self.model, loader, tc, self.device, params=params, loss_fn=loss_fn, **length)
                )
        if o.global_steps > 0:
            with trainable_only(self.model, self.split.shared) as params:
                length = self._length(o.global_steps, o.global_unit)
                results.append(
                    train_local(self.model, loader, tc, self.device, params=params, loss_fn=loss_fn, **length)
                )
            x1 = get_arrays(self.model, self.split.shared)
            update = {k: x0[k] - x1[k] for k in self.split.shared}
            set_arrays(self.model, x0)  # x is the server's; only the change is sent
            steps = results[-1].num_steps
        else:
            update, steps, grad_loss = self.shared_gradient(loader, loss_fn)
            results.append(TrainResult(grad_loss, float("nan"), len(self.data.train), 0))
        last = results[-1]
        result = TrainResult(
            loss=last.loss,
            accuracy=last.accuracy,
            num_examples=len(self.data.train),
            num_steps=sum(r.num_steps for r in results) + (0 if o.global_steps > 0 else steps),
        )
        return result, attack.distort(update, attack_seed(self.cfg.seed, self.client_id, server_round))

    def shared_gradient(self, loader, loss_fn: nn.Module) -> tuple[dict[str, np.ndarray], int, float]:
        """∇_x of the mean training loss at (x, y_i) over ``grad_batches`` batches (or one
        pass); returns (gradient, batches, mean loss)."""
        batches = self.options.grad_batches if self.options.grad_batches is not None else len(loader)
        names = set(self.split.shared)
        params = {n: p for n, p in self.model.named_parameters() if n in names}
        self.model.to(self.device).train()
        self.model.zero_grad(set_to_none=True)
        seen, total = 0, 0.0
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        with trainable_only(self.model, params):
            for x, y in itertools.islice(cycle(loader), batches):
                x, y = x.to(self.device), y.to(self.device)
                loss = loss_fn(self.model(x), y) * len(y)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for (n, _), g in zip(params.items(), grads, strict=True):
                    if g is not None:
                        sums[n] += g
                seen += len(y)
                total += float(loss.detach())
        grads = {n: (s / max(seen, 1)).detach().cpu().numpy() for n, s in sums.items()}
        # Buffers in the shared split (none in a ViT) have no gradient: send zeros.
        shared = get_arrays(self.model, self.split.shared)
        return {k: grads.get(k, np.zeros_like(v)) for k, v in shared.items()}, batches, total / max(seen, 1)
