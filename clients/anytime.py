"""Anytime / anywhere client (Liu et al. 2022; :mod:`fedvit.models.anytime`, :mod:`strategies.anytime`).

* **Tier**: the client's max depth ``k``: the SuperNode's ``--node-config max-depth=k`` (a real
  device says what it can run), else ``model.anytime.tiers[client_id % len]``, else the full
  depth. The client reports it when it identifies itself, so the server uses the same tier.
  Its model runs blocks ``1..k`` only; its shared split is the adapters of exits ``<= k`` plus
  the other shared parameters (the exit head unless ``exit`` is private), so that
  is exactly what it receives and sends.
* **Frozen backbone**: in the private split (never sent) but never trained and not stored
  either: every client rebuilds it identically (seeded init + ``model.pretrained``). The stored
  private state is the rest of the private split (client token; the exit head when private).
* **Loss**: the sum of the exits' cross-entropies, plus ``distill_weight`` × the KL divergence
  of each shallower exit from the (detached) deepest one at ``distill_temperature`` (× T²).
  No AMP here (adapters are small; CPU runs).
* **Personalization at evaluation**: ``finetune_steps`` local steps on ``finetune``
  (``adapters``: the held adapters; ``head``: the exit head; ``all``: both and the client token),
  used for that evaluation only (like FedBABU). A private head (``exit`` in
  ``method.private``) is the persistent alternative.
* **Anytime evaluation**: ``test-acc-exit<d>`` / ``val-acc-exit<d>`` for every exit ``d <= k``;
  ``test-acc`` / ``test-loss`` are the deepest exit's; ``tier`` is ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clients.base import ClientSetup, PartialClient, trainable_only
from fedvit.config import ConfigError, FedvitConfig
from fedvit.export import ExportPolicy
from fedvit.models.anytime import AnytimeViT, client_tier, keys_up_to
from fedvit.params import ParameterSplit, get_arrays, parameter_groups, set_arrays
from fedvit.registry import method_options, option_error, register_client
from fedvit.training import TrainResult, count_steps, make_loader, train_local

FINETUNE_PARTS = ("adapters", "head", "all")
NODE_TIER_KEY = "max-depth"


def device_tier(setup: ClientSetup) -> int:
    """This client's max depth: node config ``max-depth`` (must be an exit depth), else
    ``model.anytime.tiers``, else the full depth."""
    exits = list(setup.model.exit_depths)
    declared = setup.node_config.get(NODE_TIER_KEY)
    if declared is None:
        return client_tier(setup.cfg.model.anytime.tiers, setup.client_id, exits[-1])
    text = str(declared).strip()
    if isinstance(declared, bool) or not text.lstrip("-").isdigit() or int(text) not in exits:
        raise ValueError(
            f"node config {NODE_TIER_KEY}={declared!r}: must be one of the model's exit depths {exits}"
        )
    return int(text)


class AnytimeExport(ExportPolicy):
    """``fedvit export`` of an anytime client: the model cut at one exit, without the backbone in
    the state directory."""

    def check(self, client_cls: type, cfg: FedvitConfig) -> None:
        """Exportable unless evaluation fine-tunes first (that model is never stored)."""
        steps = method_options(cfg)[0].finetune_steps
        if steps:
            raise ConfigError(
                f"method '{cfg.method.name}': finetune_steps={steps} fine-tunes at each evaluation and "
                "keeps nothing, so the evaluated model is not stored; export is not supported "
                "(make the head private with method.private instead)"
            )

    def stored_private_keys(self, model: nn.Module, split: ParameterSplit) -> list[str]:
        """The frozen backbone is rebuilt (seeded init + ``model.pretrained``), not stored."""
        backbone = set(parameter_groups(model)["backbone"])
        return [k for k in split.private if k not in backbone]

    def cut(self, model: nn.Module, cfg: FedvitConfig, exit: int | None, tier: int | None) -> dict:
        """Keep blocks and adapters up to exit ``exit`` only, so the model outputs that exit and
        the file holds nothing deeper (default: the client's tier, else the deepest exit). An
        exit beyond the client's tier was never trained by it."""
        assert isinstance(model, AnytimeViT)
        exits = list(model.exit_depths)
        depth = exit if exit is not None else (tier if tier is not None else exits[-1])
        if depth not in exits:
            raise ConfigError(f"--exit {depth}: the model's exits are at depths {exits}")
        if tier is not None and depth > tier:
            raise ConfigError(f"--exit {depth}: this client is tier {tier}; it never trained a deeper exit")
        model.truncate(depth)
        return {"exit": depth, "tier": tier, "exits": exits}


@register_client("anytime")
class AnytimeClient(PartialClient):
    """Trains the adapters (and exit head) of exits up to its tier on a frozen backbone."""

    @dataclass
    class Options:
        distill_weight: float = 0.0
        distill_temperature: float = 1.0
        finetune_steps: int = 0
        finetune: str = "adapters"  # adapters | head | all

        def __post_init__(self) -> None:
            if self.distill_weight < 0:
                raise option_error("distill_weight", f"must be >= 0, got {self.distill_weight}")
            if self.distill_temperature <= 0:
                raise option_error("distill_temperature", f"must be > 0, got {self.distill_temperature}")
            if self.finetune_steps < 0:
                raise option_error("finetune_steps", f"must be >= 0, got {self.finetune_steps}")
            if self.finetune not in FINETUNE_PARTS:
                raise option_error("finetune", f"must be one of {FINETUNE_PARTS}, got '{self.finetune}'")

    def __init__(self, setup: ClientSetup) -> None:
        model = setup.model
        if not isinstance(model, AnytimeViT):
            raise ValueError("client 'anytime' needs model.anytime.enabled=true")
        self.tier = device_tier(setup)
        model.max_depth = self.tier
        groups = parameter_groups(model)
        self.backbone = frozenset(groups["backbone"])
        if not self.backbone <= set(setup.split.private):
            raise ValueError("client 'anytime': method.private must contain 'backbone' (it is never sent)")
        self.head_keys = groups["exit"]
        split = ParameterSplit(
            shared=keys_up_to(setup.split.shared, self.tier),
            private=setup.split.private,
            private_groups=setup.split.private_groups,
        )
        super().__init__(replace(setup, split=split))

    #: Beyond the base client's: the tier (identity and evaluation); per-exit accuracies below.
    REPLY_METRICS: ClassVar = {"query": ("tier",), "evaluate": ("tier",)}

    @classmethod
    def reply_metrics(cls, setup: ClientSetup) -> dict[str, frozenset[str]]:
        """Adds ``test-acc-exit<d>`` / ``val-acc-exit<d>`` for each of the model's exits."""
        out = super().reply_metrics(setup)
        exits = [f"{split}-acc-exit{d}" for d in setup.model.exit_depths for split in ("test", "val")]
        return {**out, "evaluate": out["evaluate"] | frozenset(exits)}

    @staticmethod
    def describe(setup: ClientSetup) -> dict[str, Any]:
        return {"tier": device_tier(setup)}

    #: Exported cut at an exit (its tier by default), backbone rebuilt, not stored.
    export: ClassVar[ExportPolicy] = AnytimeExport()

    def check_tier(self, config: dict[str, Any]) -> None:
        """The server's idea of this client's tier (from its query reply) must be this one."""
        if "tier" in config and int(config["tier"]) != self.tier:
            raise ValueError(
                f"the server treats client {self.client_id} as tier {config['tier']}, but it is tier "
                f"{self.tier} ({NODE_TIER_KEY} / model.anytime.tiers changed since it identified itself)"
            )

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        self.check_tier(config)
        return super().fit(parameters, config)

    # ------------------------------------------------------------------ private state

    def _stored_keys(self) -> list[str]:
        return self.export.stored_private_keys(self.model, self.split)

    def private_state_shapes(self) -> dict[str, tuple[int, ...]]:
        sd = self.model.state_dict()
        return {k: tuple(sd[k].shape) for k in self._stored_keys()}

    def private_state(self) -> dict[str, np.ndarray]:
        return get_arrays(self.model, self._stored_keys())

    def trainable_keys(self) -> list[str]:
        """What local training updates: the held shared keys and the stored private ones."""
        return [*self.split.shared, *self._stored_keys()]

    # ------------------------------------------------------------------ training

    def exit_loss(self, logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """Sum of the exits' cross-entropies (+ self-distillation from the deepest exit)."""
        loss = sum(F.cross_entropy(z, y) for z in logits)
        o = self.options
        if o.distill_weight > 0 and len(logits) > 1:
            t = o.distill_temperature
            target = F.softmax(logits[-1].detach() / t, dim=-1)
            kl = sum(
                F.kl_div(F.log_softmax(z / t, dim=-1), target, reduction="batchmean") for z in logits[:-1]
            )
            loss = loss + o.distill_weight * t * t * kl
        return loss  # type: ignore[return-value]

    def exit_forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """:data:`fedvit.training.Forward` of the exits: :meth:`exit_loss` and the deepest exit's logits."""
        logits = model.forward_exits(x)
        return self.exit_loss(logits, y), logits[-1]

    def train_exits(self, loader, keys: list[str], steps: int) -> TrainResult:
        """``steps`` optimizer steps on ``keys`` with :meth:`exit_loss` (the standard loop: AMP on
        CUDA, gradient clipping); accuracy of the deepest exit."""
        with trainable_only(self.model, keys) as params:
            return train_local(
                self.model,
                loader,
                self.cfg.train,
                self.device,
                params=params,
                steps=steps,
                forward=self.exit_forward,
            )

    def local_train(self, server_round: int) -> TrainResult:
        loader = self.train_loader(server_round)
        return self.train_exits(loader, self.trainable_keys(), count_steps(self.cfg.train, loader))

    def personalize_for_eval(self, server_round: int) -> None:
        """``finetune_steps`` steps on the ``finetune`` part (undone after the evaluation)."""
        o = self.options
        if o.finetune_steps == 0:
            return
        adapters = [k for k in self.trainable_keys() if k.startswith("adapters.")]
        head = [k for k in self.trainable_keys() if k in self.head_keys]
        keys = {"adapters": adapters, "head": head, "all": self.trainable_keys()}[o.finetune]
        self.train_exits(self.train_loader(server_round), keys, o.finetune_steps)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def eval_exits(self, dataset) -> dict[str, float]:
        """Accuracy of every exit and the deepest exit's loss on ``dataset``."""
        loader = make_loader(
            dataset, self.cfg.train.eval_batch_size, shuffle=False, workers=self.cfg.data.num_workers
        )
        model = self.model.to(self.device).eval()
        exits = model.active_exits()
        correct, loss, seen = np.zeros(len(exits)), 0.0, 0
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            logits = model.forward_exits(x)
            correct += [(z.argmax(1) == y).sum().item() for z in logits]
            loss += F.cross_entropy(logits[-1].float(), y, reduction="sum").item()
            seen += len(y)
        nan = float("nan")
        out = {f"acc-exit{d}": (c / seen if seen else nan) for d, c in zip(exits, correct, strict=True)}
        out.update({"acc": out[f"acc-exit{exits[-1]}"], "loss": loss / seen if seen else nan, "num": seen})
        return out

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict]:
        self.check_tier(config)
        self.set_parameters(parameters)
        keep = get_arrays(self.model, self.trainable_keys())
        try:
            self.personalize_for_eval(int(config.get("server-round", 0)))
            test, val = self.eval_exits(self.data.test), self.eval_exits(self.data.val)
        finally:
            set_arrays(self.model, keep)  # fine-tuning is for this evaluation only
        metrics: dict[str, Any] = {"tier": self.tier}
        for prefix, res in (("test", test), ("val", val)):
            for k, v in res.items():
                metrics[f"num-{prefix}" if k == "num" else f"{prefix}-{k}"] = v
        return test["loss"], int(test["num"]), metrics
