"""When the server evaluates, and whom it asks (``server.eval_every``, ``eval_fraction``,
``eval_min_clients``, ``eval_full_rounds``; see ``docs/results.md``, "Sampled evaluation")."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EvalSchedule:
    """The evaluation protocol of a run: evaluated rounds, and the clients asked in each."""

    every: int = 1
    fraction: float = 1.0
    min_clients: int = 1
    full_rounds: frozenset[int] = field(default_factory=frozenset)
    seed: int = 0

    @classmethod
    def of(
        cls, every: int, fraction: float, min_clients: int, full_rounds: Iterable[int], seed: int
    ) -> EvalSchedule:
        """A checked schedule (``ValueError`` for a fraction outside (0, 1])."""
        if not 0 < fraction <= 1:
            raise ValueError(f"eval_fraction must be in (0, 1], got {fraction}")
        rounds = frozenset(int(r) for r in full_rounds)
        return cls(every, float(fraction), max(1, int(min_clients)), rounds, seed)

    def due(self, server_round: int, num_rounds: int) -> bool:
        """Evaluated rounds: every ``every``-th, the listed ``full_rounds`` and the last."""
        return server_round % self.every == 0 or self._always(server_round, num_rounds)

    def full(self, server_round: int, num_rounds: int) -> bool:
        """Whether every client is asked in ``server_round``: always by default (``fraction``
        1); with a sampled evaluation, in the last round and the ``full_rounds``."""
        return self.fraction >= 1 or self._always(server_round, num_rounds)

    def _always(self, server_round: int, num_rounds: int) -> bool:
        """The last round and the listed ``full_rounds``: evaluated, with every client."""
        return server_round == num_rounds or server_round in self.full_rounds

    def sample(
        self, server_round: int, num_rounds: int, nodes: list[int], client_of: Callable[[int], int]
    ) -> list[int]:
        """The live ``nodes`` asked to evaluate in ``server_round``: all of them in a full
        evaluation, else ``round(fraction * len(nodes))`` of them (at least ``min_clients``),
        drawn with a generator seeded by the run's seed and the round only: independent of the
        training sample, the same clients for every method with that seed."""
        if self.full(server_round, num_rounds):
            return list(nodes)
        size = min(len(nodes), max(self.min_clients, round(self.fraction * len(nodes))))
        rng = random.Random(f"fedvit-eval/{self.seed}/{server_round}")
        return sorted(rng.sample(sorted(nodes, key=client_of), size), key=client_of)

    def protocol(self) -> dict[str, Any]:
        """What ``results.json`` ``evaluation`` states about the protocol."""
        sampled = self.fraction < 1
        return {
            "mode": "sampled" if sampled else "full",
            "description": (
                f"a seeded sample of {100 * self.fraction:g}% of the clients (at least "
                f"{self.min_clients}) per evaluated round; every client in the last round and in "
                "full_rounds"
                if sampled
                else "every client in every evaluated round"
            ),
            "eval_every": self.every,
            "fraction": self.fraction,
            "min_clients": self.min_clients,
            "full_rounds": sorted(self.full_rounds),
            "last_round_full": True,
        }
