"""FedAlt (Pillutla et al. 2022, "Federated Learning with Partial Model Personalization"),
client side: first the private part with the shared part frozen, then the shared part with
the private part frozen, each phase with a fresh optimizer. The server side (pseudo-gradient
of the shared part for a server optimizer, clients weighted by local batches) is
``strategies/server_opt.py``. FedSim, which trains both parts together, needs no client of its
own: it is the ``partial`` client with that strategy (``conf/method/fedsim.yaml``).

The private groups are ``method.private`` (head by default; an input layer, a block or
adapters are config values). Options: ``private_epochs: 1``, ``shared_epochs: null``
(= ``train.local_steps`` / ``train.local_epochs``). ``num-steps`` reports the local batches
of both phases, which is what the server weights by.
"""

from __future__ import annotations

from dataclasses import dataclass

from clients.fedrep import AlternatingClient, Phase, check_epochs, phase_length
from fedvit.registry import register_client


@register_client("fedalt")
class FedAltClient(AlternatingClient):
    """Private part for ``private_epochs``, then shared part for ``shared_epochs``."""

    @dataclass
    class Options:
        private_epochs: int = 1
        shared_epochs: int | None = None  # None: train.local_steps / train.local_epochs

        def __post_init__(self) -> None:
            check_epochs(self.private_epochs, "private_epochs", 0)
            check_epochs(self.shared_epochs, "shared_epochs", 1)

    def phases(self) -> list[Phase]:
        return [
            Phase("private", self.split.private, phase_length(self.options.private_epochs)),
            Phase("shared", self.split.shared, phase_length(self.options.shared_epochs)),
        ]
