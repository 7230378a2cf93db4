"""FedRep (Collins et al. 2021): the head is private and trained first with the body frozen,
then the body with the head frozen; only the body is sent.

"Head" here is the private split (``method.private``, ``[head]`` in ``conf/method/fedrep.yaml``:
the classifier and its pre-head norm) and "body" the shared split, so another split is a
config value. Each phase builds a fresh optimizer (``train_local`` makes one per call). The
alternation itself lives in :class:`AlternatingClient`, which FedAlt reuses with its own phase
lengths (``clients/fedalt.py``).

Defaults: ``head_epochs: 2``, ``body_epochs: null`` (= ``train.local_steps`` /
``train.local_epochs``, the body budget every other method gets). The FedRep paper uses 10 head
epochs and 1 body epoch; a head epoch costs about a forward pass (no gradient flows into the
frozen body), so ``method.options.head_epochs=10`` reproduces it at roughly 3-4x the default's
local compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from clients.base import ClientSetup, PartialClient, trainable_only
from fedvit.registry import option_error, register_client
from fedvit.training import TrainResult, train_local


@dataclass
class Phase:
    """One local training phase: which state-dict keys train, and for how long
    (``train_local`` keyword arguments: ``epochs=``/``steps=``; empty = the train config)."""

    name: str
    keys: Sequence[str]
    length: dict[str, int]


def check_epochs(value: int | None, key: str, minimum: int) -> None:
    if value is not None and value < minimum:
        raise option_error(key, f"must be >= {minimum}, got {value}")


class AlternatingClient(PartialClient):
    """Trains the model in consecutive phases, each on one part with the rest frozen."""

    def __init__(self, setup: ClientSetup) -> None:
        super().__init__(setup)
        if not self.split.private or not self.split.shared:
            raise ValueError(
                f"method '{self.cfg.method.name}' alternates between the private and the shared part: "
                f"both must be non-empty (method.private={list(self.cfg.method.private)})"
            )

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def local_train(self, server_round: int) -> TrainResult:
        loader = self.train_loader(server_round)
        results: list[TrainResult] = []
        for phase in self.phases():
            if phase.length.get("epochs") == 0 or phase.length.get("steps") == 0:
                continue
            with trainable_only(self.model, phase.keys) as params:
                tc, device = self.cfg.train, self.device
                results.append(train_local(self.model, loader, tc, device, params=params, **phase.length))
        last = results[-1]  # loss/accuracy of the last phase (the part that is sent)
        return TrainResult(
            loss=last.loss,
            accuracy=last.accuracy,
            num_examples=sum(r.num_examples for r in results),
            num_steps=sum(r.num_steps for r in results),  # every local batch, all phases
        )


def phase_length(epochs: int | None) -> dict[str, Any]:
    return {"epochs": epochs} if epochs is not None else {}


@register_client("fedrep")
class FedRepClient(AlternatingClient):
    """Head (private split) for ``head_epochs`` with the body frozen, then body (shared split)
    for ``body_epochs`` with the head frozen."""

    @dataclass
    class Options:
        head_epochs: int = 2
        body_epochs: int | None = None  # None: train.local_steps / train.local_epochs

        def __post_init__(self) -> None:
            check_epochs(self.head_epochs, "head_epochs", 0)
            check_epochs(self.body_epochs, "body_epochs", 1)

    def phases(self) -> list[Phase]:
        return [
            Phase("head", self.split.private, {"epochs": self.options.head_epochs}),
            Phase("body", self.split.shared, phase_length(self.options.body_epochs)),
        ]
