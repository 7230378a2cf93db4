"""FedTP (Li et al., IEEE TNNLS 2023): a server hypernetwork generates each client's
self-attention Q/K/V ("learn to personalize").

What crosses the wire, per sampled client i and round:

* ``train`` to client i: ``arrays`` = the FedAvg'd shared parameters **plus** W_i, the
  generated tensors of the ``generated`` groups (default ``attn.qkv``: every block's Q/K/V
  projection weight and bias), made by the hypernetwork from client i's **own** embedding,
  also the first time client i trains (as the authors do): the hypernetwork step below
  differentiates at that embedding, so W_i must have been generated there. Clients in the
  same round receive identical shared parameters and different W_i.
* The reply: the shared parameters and W_i after local training (the client trains all of
  its parameters; it is the ordinary ``partial`` client, for which W_i is simply part of what
  it receives and returns). Private groups (``fedtp-per``: the classifier) never leave the client.
* Server: the shared part is the sample-weighted mean of the replies **without** the
  generated keys (Q/K/V are never averaged); the hypernetwork takes one pFedHN step from
  ``Δ_i = W_i(sent) − W_i(returned)``, clients weighted by their training examples
  (:func:`fedvit.hypernet.hypernet_step`).
* ``evaluate`` to every client: the shared parameters plus its generated W_i. A client whose
  update never reached the hypernetwork has an untrained embedding; with ``unseen_embedding``
  ``mean`` (default) it is evaluated with the mean embedding of the clients that trained (an
  evaluation choice only, never used for training), with ``own`` with its own. Each client's
  evaluation metrics in ``results.json`` carry ``mean-embedding`` (1: evaluated with the mean
  embedding, 0: with its own).

Options (``method.options``): ``generated`` (groups, default ``[attn.qkv]``), ``embed_dim``
128, ``hidden`` 150, ``n_hidden`` 3, ``head`` full | basis (``basis_size`` 8), ``init_gain``
0.1, the hypernetwork's SGD: ``hn_lr`` 0.01, ``hn_momentum`` 0.9, ``hn_weight_decay`` 1e-3, and
``unseen_embedding`` mean | own (evaluation of never-trained clients, above).
The hypernetwork, its optimizer state and the set of trained clients are checkpointed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log

from fedvit.hypernet import HEAD_KINDS, HypernetConfig, HypernetSGD, WeightHypernet, hypernet_step
from fedvit.params import check_arrays, count, get_arrays, parameter_groups
from fedvit.registry import method_options, option_error, register_strategy
from fedvit.wire import to_numpy, to_record
from strategies.base import PersonalizedStrategy
from strategies.rounds import ClientUpdate, Payload, RoundPlan, Sent, weighted_mean

UNSEEN_EMBEDDINGS = ("mean", "own")


def generated_keys(model, private: list[str], groups: list[str]) -> list[str]:
    """State-dict keys of ``groups`` (exact module paths), refusing private ones."""
    table = parameter_groups(model)
    keys: list[str] = []
    for g in groups:
        if g not in table:
            raise option_error("generated", f"unknown parameter group '{g}'")
        keys += [k for k in table[g] if k not in keys]
    private_keys = {k for g in private for k in table[g]}
    overlap = sorted(set(keys) & private_keys)
    if overlap:
        raise option_error("generated", f"{overlap[:3]} are private (method.private), not generated")
    if not keys:
        raise option_error("generated", "selects no parameters")
    return keys


@register_strategy("fedtp")
class FedTPStrategy(PersonalizedStrategy):
    """FedAvg of the shared part + a hypernetwork that generates each client's ``generated`` tensors."""

    exportable = False  # every client gets its own W_i, which the checkpoint does not hold
    dp_refusal = (
        "the server generates each client's own Q/K/V with a hypernetwork that learns from every "
        "client's individual returned tensors; no single noised aggregate reaches the clients"
    )

    @dataclass
    class Options:
        generated: list[str] = field(default_factory=lambda: ["attn.qkv"])
        # the hypernetwork's sizes: HypernetConfig's defaults (FedTP's)
        embed_dim: int = HypernetConfig.embed_dim
        hidden: int = HypernetConfig.hidden
        n_hidden: int = HypernetConfig.n_hidden
        head: str = HypernetConfig.head  # full | basis
        basis_size: int = HypernetConfig.basis_size
        init_gain: float = HypernetConfig.init_gain
        hn_lr: float = 0.01
        hn_momentum: float = 0.9
        hn_weight_decay: float = 1e-3
        unseen_embedding: str = "mean"  # mean | own: evaluating a client that never trained

        def __post_init__(self) -> None:
            for key in ("embed_dim", "hidden", "basis_size"):
                if getattr(self, key) < 1:
                    raise option_error(key, f"must be >= 1, got {getattr(self, key)}")
            if self.n_hidden < 0:
                raise option_error("n_hidden", f"must be >= 0, got {self.n_hidden}")
            if self.head not in HEAD_KINDS:
                raise option_error("head", f"must be one of {HEAD_KINDS}, got '{self.head}'")
            if not self.hn_lr > 0:
                raise option_error("hn_lr", f"must be > 0, got {self.hn_lr}")
            if not 0 <= self.hn_momentum < 1:
                raise option_error("hn_momentum", f"must be in [0, 1), got {self.hn_momentum}")
            if self.hn_weight_decay < 0 or self.init_gain < 0:
                raise option_error("hn_weight_decay", "hn_weight_decay and init_gain must be >= 0")
            if self.unseen_embedding not in UNSEEN_EMBEDDINGS:
                raise option_error(
                    "unseen_embedding", f"must be one of {UNSEEN_EMBEDDINGS}, got '{self.unseen_embedding}'"
                )

        def hypernet(self) -> HypernetConfig:
            """The hypernetwork's sizes."""
            return HypernetConfig(
                self.embed_dim, self.hidden, self.n_hidden, self.head, self.basis_size, self.init_gain
            )

    @classmethod
    def from_config(cls, cfg, *, model, split, **kwargs: Any):
        options = method_options(cfg)[1]
        keys = generated_keys(model, list(cfg.method.private), list(options.generated))
        return super().from_config(
            cfg, model=model, split=split, options=options, generated_init=get_arrays(model, keys), **kwargs
        )

    def __init__(
        self, *, generated_init: dict[str, np.ndarray], options: Options | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.options = options if options is not None else self.Options()
        o = self.options
        self.generated_shapes = {k: tuple(v.shape) for k, v in generated_init.items()}
        self.shared_shapes = {k: s for k, s in self.shared_shapes.items() if k not in self.generated_shapes}
        self.hnet = WeightHypernet(self.num_clients, generated_init, o.hypernet(), seed=self.seed)
        self.optimizer = HypernetSGD(self.hnet, o.hn_lr, o.hn_momentum, o.hn_weight_decay)
        self.trained: list[int] = []  # clients whose update reached the hypernetwork

    def server_resources(self) -> dict[str, float]:
        return {
            "hypernetwork_params": self.hnet.num_parameters(),
            "params_generated_per_client": count(self.generated_shapes),
        }

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> FedTP hypernetwork (%s head): %s parameters, %d tensors (%s values) per client",
            self.options.head,
            f"{self.hnet.num_parameters():,}",
            len(self.generated_shapes),
            f"{count(self.generated_shapes):,}",
        )
        super().summary()

    # ------------------------------------------------------------------ per-client messages

    def _check_client(self, client_id: int) -> None:
        if not 0 <= client_id < self.num_clients:
            raise ValueError(f"client {client_id} has no embedding (clients.num_clients={self.num_clients})")

    def generate(self, client_id: int) -> dict[str, np.ndarray]:
        """W_i from client ``client_id``'s own embedding: what it trains from."""
        self._check_client(client_id)
        return self.hnet.generate(client_id)

    def generate_for_evaluation(self, client_id: int) -> tuple[dict[str, np.ndarray], bool]:
        """W_i to evaluate client ``client_id`` with, and whether it came from the mean
        embedding of the trained clients (``unseen_embedding: mean`` and the client never trained
        while others did)."""
        self._check_client(client_id)
        from_mean = (
            self.options.unseen_embedding == "mean" and bool(self.trained) and client_id not in self.trained
        )
        return self.hnet.generate(client_id, self.trained if from_mean else ()), from_mean

    def train_arrays(self, server_round: int, client_id: int, arrays: ArrayRecord) -> Payload:
        """The shared parameters plus W_i from the client's own embedding (noted for Δ_i)."""
        generated = self.generate(client_id)
        return Payload(self._with(arrays, generated), {"generated": generated})

    def evaluate_arrays(self, server_round: int, client_id: int, arrays: ArrayRecord) -> Payload:
        """The shared parameters plus W_i per :meth:`generate_for_evaluation` (noted: whether
        it came from the mean embedding)."""
        generated, from_mean = self.generate_for_evaluation(client_id)
        return Payload(self._with(arrays, generated), {"mean-embedding": from_mean})

    def _with(self, arrays: ArrayRecord, generated: dict[str, np.ndarray]) -> ArrayRecord:
        shared = {k: v for k, v in to_numpy(arrays).items() if k in self.shared_shapes}
        return to_record({**shared, **generated})

    def client_eval_metrics(
        self, client_id: int, metrics: dict[str, Any], sent: Sent | None
    ) -> dict[str, Any]:
        """Adds ``mean-embedding``: 1 if the client was evaluated with the mean embedding of the
        trained clients (it never trained), 0 if with its own."""
        from_mean = sent is not None and bool(sent.note.get("mean-embedding", False))
        return {**metrics, "mean-embedding": float(from_mean)}

    def aggregate_shared(self, plan: RoundPlan, updates: list[ClientUpdate]) -> ArrayRecord:
        """One hypernetwork step from Δ_i = W_i(sent) − W_i(returned); the mean of the rest."""
        total = float(sum(u.num_examples for u in updates))
        changes = [
            (
                u.client_id,
                u.num_examples / total,
                {k: plan.sent[u.client_id].note["generated"][k] - u.arrays[k] for k in self.generated_shapes},
            )
            for u in updates
        ]
        hypernet_step(self.hnet, self.optimizer, changes)
        self.trained = sorted(set(self.trained) | {u.client_id for u in updates})
        return to_record(weighted_mean(updates, self.shared_shapes))

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"hnet.{k}": v.detach().numpy().copy() for k, v in self.hnet.state_dict().items()}
        arrays.update({f"opt.{k}": v for k, v in self.optimizer.state_arrays().items()})
        return arrays, {"trained": self.trained, "hypernet": asdict(self.options)}

    def load_state_dict(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        saved = state.get("hypernet", {})
        for key in ("generated", "embed_dim", "hidden", "n_hidden", "head", "basis_size"):
            if key in saved and saved[key] != getattr(self.options, key):
                raise ValueError(
                    f"server.resume: the checkpoint's hypernetwork has {key}={saved[key]!r}, "
                    f"this run uses {getattr(self.options, key)!r}"
                )
        own = self.hnet.state_dict()
        hnet = {k[5:]: v for k, v in arrays.items() if k.startswith("hnet.")}
        check_arrays(hnet, {k: tuple(v.shape) for k, v in own.items()}, who="server.resume hypernetwork")
        self.hnet.load_state_dict({k: torch.as_tensor(v) for k, v in hnet.items()})
        self.optimizer.load_state_arrays({k[4:]: v for k, v in arrays.items() if k.startswith("opt.")})
        self.trained = [int(c) for c in state.get("trained", [])]
