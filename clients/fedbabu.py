"""FedBABU (Oh et al. 2022): the head stays at its random initialization and frozen during
federated training; only the body is trained and aggregated. At evaluation each client
fine-tunes a copy of the head on its own train split and tests with it.

The head is the **private split** (``method.private: [classifier]``: the linear classifier, as
in the paper; the pre-head norm is part of the trained body). It never changes during
training, so keeping it private loses nothing: every client builds the same seeded
initialization, nothing of it is sent, and the stored private state is
that initialization after any number of rounds. The fine-tuned head lives only inside one
``evaluate`` call: it is never saved, never sent, and the next round trains from the
initialization again.

Options: ``finetune_epochs: 1`` (epochs over the local train split), ``finetune_steps: null``
(if set, that many optimizer steps instead), ``finetune: head`` (what is fine-tuned: ``head``, or
``all`` for the whole model, body included; either way undone after the evaluation). The paper
fine-tunes the head for several epochs (and also studies fine-tuning the whole model);
``finetune_epochs=0`` evaluates the initial head. The FedPerfix authors' code evaluates after one
step on the whole model (``finetune_steps=1 finetune=all``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clients.base import ClientSetup, PartialClient, trainable_only
from clients.fedrep import check_epochs
from fedvit.params import get_arrays, set_arrays
from fedvit.registry import option_error, register_client
from fedvit.training import TrainResult, train_local

FINETUNE_PARTS = ("head", "all")


@register_client("fedbabu")
class FedBABUClient(PartialClient):
    """Body-only federated training; head fine-tuning only for evaluation."""

    @dataclass
    class Options:
        finetune_epochs: int = 1
        finetune_steps: int | None = None  # if set, overrides finetune_epochs
        finetune: str = "head"  # head | all: the part fine-tuned at evaluation

        def __post_init__(self) -> None:
            check_epochs(self.finetune_epochs, "finetune_epochs", 0)
            check_epochs(self.finetune_steps, "finetune_steps", 0)
            if self.finetune not in FINETUNE_PARTS:
                raise option_error("finetune", f"must be one of {FINETUNE_PARTS}, got '{self.finetune}'")

    def __init__(self, setup: ClientSetup) -> None:
        super().__init__(setup)
        if not self.split.private:
            raise ValueError(
                "fedbabu keeps the head frozen at its initialization: method.private must name it"
            )

    def local_train(self, server_round: int) -> TrainResult:
        """Train the body (shared split) only; the head keeps its initialization."""
        with trainable_only(self.model, self.split.shared) as params:
            return train_local(
                self.model, self.train_loader(server_round), self.cfg.train, self.device, params=params
            )

    def _finetuned(self) -> list[str]:
        """The parameters fine-tuned at evaluation: the head (private split), or everything."""
        return list(self.split.private) + (list(self.split.shared) if self.options.finetune == "all" else [])

    def personalize_for_eval(self, server_round: int) -> None:
        """Fine-tune the head (private split) with the body frozen, or the whole model."""
        o = self.options
        steps, epochs = o.finetune_steps, o.finetune_epochs
        length = {"steps": steps} if steps is not None else {"epochs": epochs}
        if next(iter(length.values())) == 0:
            return
        loader = self.train_loader(server_round)
        with trainable_only(self.model, self._finetuned()) as params:
            train_local(self.model, loader, self.cfg.train, self.device, params=params, **length)

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict]:
        head = get_arrays(self.model, self.split.private)
        try:
            return super().evaluate(parameters, config)
        finally:  # the fine-tuned copy is used for this evaluation only
            set_arrays(self.model, head)
            if self.options.finetune == "all":
                self.set_parameters(parameters)  # the body back to the received model
