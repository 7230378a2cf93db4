"""Server-side hypernetworks that generate client weights, and the pFedHN update rule.

:class:`WeightHypernet` (FedTP, Li et al. 2023; pFedHN, Shamsian et al. 2021): a learned
embedding per client -> MLP (``Linear(E, H)`` then ``n_hidden`` x ``ReLU, Linear(H, H)``) -> one
output head per generated tensor. Heads:

* ``full``: ``Linear(H, numel)`` per tensor, as in FedTP. At the authors' reference ViT (width
  128, attention inner width 512, depth 6) this is ~178M parameters for a ~2M-parameter model.
* ``basis``: the tensor is ``bias + Σ_k c_k(h) · B_k`` with ``K = basis_size`` learned basis
  tensors shared by all clients and coefficients ``c = Linear(H, K)(h)``: a rank-K factorization
  of the full head's weight (``numel·H -> numel·K + H·K``), ~19x smaller at K = 8, H = 150;
  the generated tensors stay full-rank matrices.

Both heads start with their bias at the model's initial weights and a small random part
(``init_gain``), so every client starts near the same seeded initialization the other methods
start from.

:func:`hypernet_step` is the pFedHN rule: with ``Δ_i = W_i(sent) − W_i(returned)`` (the
client's local change, reversed: ≈ lr·∇L_i), the gradient for the hypernetwork parameters and
client i's embedding is the vector–Jacobian product ``(∂W_i/∂φ)ᵀ Δ_i``, summed over clients with
their weights; an SGD step (momentum, weight decay) descends along it. The Jacobian is taken at
client i's own embedding, so W_i(sent) must have been generated there too
(:meth:`WeightHypernet.generate` without ``mean_of``), also for a client's first update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

HEAD_KINDS = ("full", "basis")


class FullHead(nn.Module):
    """``Linear(H, numel)``: one generated tensor."""

    def __init__(self, hidden: int, init: torch.Tensor, gain: float) -> None:
        super().__init__()
        self.shape = tuple(init.shape)
        self.linear = nn.Linear(hidden, init.numel())
        with torch.no_grad():
            self.linear.weight.mul_(gain)
            self.linear.bias.copy_(init.reshape(-1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h).reshape(self.shape)


class BasisHead(nn.Module):
    """``bias + Linear(H, K)(h) @ basis``: a generated tensor in a learned K-dim affine subspace."""

    def __init__(self, hidden: int, init: torch.Tensor, gain: float, basis_size: int) -> None:
        super().__init__()
        self.shape = tuple(init.shape)
        self.coeff = nn.Linear(hidden, basis_size)
        scale = float(init.std()) if init.numel() > 1 and float(init.std()) > 0 else 0.02
        self.basis = nn.Parameter(torch.randn(basis_size, init.numel()) * scale / math.sqrt(basis_size))
        self.bias = nn.Parameter(init.reshape(-1).clone())
        with torch.no_grad():
            self.coeff.weight.mul_(gain)
            self.coeff.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (self.bias + self.coeff(h) @ self.basis).reshape(self.shape)


@dataclass
class HypernetConfig:
    """Sizes of a :class:`WeightHypernet` (FedTP's defaults)."""

    embed_dim: int = 128
    hidden: int = 150
    n_hidden: int = 3
    head: str = "full"  # full | basis
    basis_size: int = 8
    init_gain: float = 0.1


def hypernet_num_parameters(
    num_clients: int, shapes: Mapping[str, Sequence[int]], cfg: HypernetConfig
) -> int:
    """Parameters of a :class:`WeightHypernet` for tensors of ``shapes``, without building it."""
    e, h = cfg.embed_dim, cfg.hidden
    total = num_clients * e + (e * h + h) + cfg.n_hidden * (h * h + h)
    for shape in shapes.values():
        n = int(np.prod(shape))
        total += (
            (h * n + n)
            if cfg.head == "full"
            else (h * cfg.basis_size + cfg.basis_size + cfg.basis_size * n + n)
        )
    return total


class WeightHypernet(nn.Module):
    """Client embedding -> MLP -> one head per generated tensor (names are state-dict keys)."""

    def __init__(self, num_clients: int, init: Mapping[str, np.ndarray], cfg: HypernetConfig, seed: int = 0):
        super().__init__()
        if cfg.head not in HEAD_KINDS:
            raise ValueError(f"hypernetwork head must be one of {HEAD_KINDS}, got '{cfg.head}'")
        self.names = list(init)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embeddings = nn.Embedding(num_clients, cfg.embed_dim)
            layers: list[nn.Module] = [nn.Linear(cfg.embed_dim, cfg.hidden)]
            for _ in range(cfg.n_hidden):
                layers += [nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden)]
            self.mlp = nn.Sequential(*layers)
            heads = []
            for name in self.names:
                t = torch.as_tensor(np.asarray(init[name]), dtype=torch.float32)
                heads.append(
                    FullHead(cfg.hidden, t, cfg.init_gain)
                    if cfg.head == "full"
                    else BasisHead(cfg.hidden, t, cfg.init_gain, cfg.basis_size)
                )
            self.heads = nn.ModuleList(heads)  # heads[j] generates self.names[j]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.mlp(embedding)
        return {name: head(h) for name, head in zip(self.names, self.heads, strict=True)}

    def embedding_of(self, client_id: int) -> torch.Tensor:
        """Client ``client_id``'s own embedding: the point its weights are generated at for
        training and the point :func:`hypernet_step` differentiates at."""
        return self.embeddings(torch.tensor(client_id))

    def mean_embedding(self, clients: Sequence[int]) -> torch.Tensor:
        """The mean embedding of ``clients`` (detached): an evaluation stand-in for a client
        whose own embedding was never trained, never a training point."""
        if not clients:
            raise ValueError("the mean embedding of no clients is undefined")
        return self.embeddings.weight[list(clients)].mean(0).detach()

    def generate(self, client_id: int, mean_of: Sequence[int] = ()) -> dict[str, np.ndarray]:
        """The weights for ``client_id`` from its own embedding, as float32 numpy arrays; with
        ``mean_of`` (evaluation only) from the mean embedding of those clients instead."""
        embedding = self.mean_embedding(mean_of) if mean_of else self.embedding_of(client_id)
        with torch.no_grad():
            out = self(embedding)
        return {k: v.numpy().astype(np.float32) for k, v in out.items()}


class HypernetSGD:
    """SGD with momentum and weight decay (torch's rule, no dampening) over named parameters,
    with a state that checkpoints as plain arrays."""

    def __init__(self, module: nn.Module, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.module, self.lr, self.momentum, self.weight_decay = module, lr, momentum, weight_decay
        self.buffers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        for name, p in self.module.named_parameters():
            if p.grad is None:
                continue
            g = p.grad + self.weight_decay * p if self.weight_decay else p.grad.clone()
            if self.momentum:
                buf = self.buffers.get(name)
                buf = g if buf is None else buf.mul_(self.momentum).add_(g)
                self.buffers[name] = buf
                g = buf
            p.sub_(self.lr * g)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {k: v.numpy().copy() for k, v in self.buffers.items()}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        names = dict(self.module.named_parameters())
        unknown = sorted(set(arrays) - set(names))
        if unknown:
            raise ValueError(f"hypernetwork optimizer state for unknown parameters {unknown[:3]}")
        self.buffers = {k: torch.as_tensor(np.asarray(v)).clone() for k, v in arrays.items()}


def hypernet_step(
    hnet: WeightHypernet,
    optimizer: HypernetSGD,
    changes: Sequence[tuple[int, float, Mapping[str, np.ndarray]]],
) -> None:
    """One pFedHN step from ``(client_id, weight, Δ)`` triples, ``Δ = sent − returned`` (per key).

    Gradient = Σ_i weight_i · (∂W_i/∂φ)ᵀ Δ_i for the MLP, the heads and client i's embedding."""
    hnet.zero_grad(set_to_none=True)
    for client_id, weight, delta in changes:
        generated = hnet(hnet.embedding_of(client_id))  # the point W_i was generated at for training
        outputs = [generated[k] for k in hnet.names]
        grads = [weight * torch.as_tensor(np.asarray(delta[k]), dtype=torch.float32) for k in hnet.names]
        torch.autograd.backward(outputs, grad_tensors=grads)
    optimizer.step()
