"""pFedLA's server state without Flower (Ma et al., CVPR 2022): layer-wise personalized
aggregation weights from one hypernetwork per client, over a disk store of every client's model.

* **Layers** (:func:`aggregation_layers`, over the shared keys only): ``block`` granularity (default):
  ``input`` = the ``patch_embed`` and ``pos_embed`` groups (``patch_embed.*``, ``pos_embed``,
  ``cls_token``, ``reg_token``; the text model's ``patch_embed.token_embed``), ``blocks.<i>`` = every
  key under module ``blocks.<i>`` (plugins living in a block included), ``output`` = everything else
  (``norm``, ``fc_norm``, ``head``). ``tensor`` granularity: every shared state-dict key is a layer.
  Layers without shared keys are dropped.
* **Hypernetwork of client i** (:class:`LayerHypernet`): embedding ``v_i`` -> ``n_layers`` x
  (``Linear``, ``ReLU``) -> one ``Linear(hidden, N)`` head per layer (weights U(0, 1), bias 0) ->
  ``ReLU`` -> normalized over clients: ``α_i^l`` (one-hot on i if the layer's sum is 0).
* **Personalized model**: ``θ̄_i^l = Σ_j α_ij^l θ_j^l``, streamed client by client from the
  :class:`~fedvit.modelstore.ModelStore` (memory: O(one model), not O(N models)).
* **Update** (:meth:`LayerAggregation.update`): with ``Δ_i = θ̄_i − θ_i(returned)`` (≈ lr·∇L_i
  at θ̄_i), ``∂L/∂α_ij^l ≈ <θ_j^l, Δ_i^l>`` (since ``∂θ̄_i^l/∂α_ij^l = θ_j^l``); that matrix is
  back-propagated through HN_i and an SGD step *descends* along it. Then ``θ_i ← θ_i(returned)``.
* **HeurpFedLA** (``heur_k = K > 0``): the K layers with the largest self weight ``α_ii^l`` are
  one-hot on self for that round (kept local); their heads are not evaluated, so they get no
  gradient and are not updated (nor their momentum).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedvit.hypernet import HypernetSGD
from fedvit.modelstore import ModelStore
from fedvit.params import model_depth, parameter_groups

GRANULARITIES = ("block", "tensor")


def aggregation_layers(
    model: nn.Module, keys: Sequence[str], granularity: str = "block"
) -> dict[str, list[str]]:
    """Layer name -> state-dict keys (of ``keys``, state-dict order) that share one α."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got '{granularity}'")
    wanted = set(keys)
    ordered = [k for k in model.state_dict() if k in wanted]
    if granularity == "tensor":
        return {k: [k] for k in ordered}
    groups = parameter_groups(model)
    inputs = set(groups["patch_embed"]) | set(groups["pos_embed"])
    layers: dict[str, list[str]] = {"input": [k for k in ordered if k in inputs]}
    taken = set(inputs)
    for i in range(model_depth(model)):
        block = [k for k in ordered if k in set(groups[f"block.{i}"]) and k not in taken]
        layers[f"blocks.{i}"] = block
        taken |= set(block)
    layers["output"] = [k for k in ordered if k not in taken]
    return {name: ks for name, ks in layers.items() if ks}


class LayerHypernet(nn.Module):
    """HN_i: embedding -> MLP -> per-layer head over the N clients -> α_i (``[L, N]``)."""

    def __init__(
        self, client_id: int, num_clients: int, num_layers: int, embed_dim: int, hidden: int, n_layers: int
    ) -> None:
        super().__init__()
        self.client_id, self.num_clients = client_id, num_clients
        self.embedding = nn.Parameter(torch.randn(embed_dim))
        mlp: list[nn.Module] = []
        width = embed_dim
        for _ in range(n_layers):
            mlp += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.mlp = nn.Sequential(*mlp)
        self.heads = nn.ModuleList(nn.Linear(width, num_clients) for _ in range(num_layers))
        with torch.no_grad():
            for head in self.heads:
                head.weight.uniform_(0.0, 1.0)
                head.bias.zero_()

    def forward(self, keep_local: Sequence[int] = ()) -> torch.Tensor:
        """α_i as ``[L, N]``; rows in ``keep_local`` are one-hot on self (their heads unused)."""
        h = self.mlp(self.embedding)
        onehot = torch.zeros(self.num_clients)
        onehot[self.client_id] = 1.0
        rows = []
        for layer, head in enumerate(self.heads):
            if layer in keep_local:
                rows.append(onehot)
                continue
            raw = torch.relu(head(h))
            total = raw.sum()
            rows.append(raw / total if float(total.detach()) > 0 else onehot)
        return torch.stack(rows)


class LayerAggregation:
    """Every client's model (on disk) and hypernetwork (in memory), and the pFedLA rules."""

    def __init__(
        self,
        layers: Mapping[str, Sequence[str]],
        initial: Mapping[str, np.ndarray],
        num_clients: int,
        store_dir: Path,
        *,
        embed_dim: int = 100,
        hidden: int = 100,
        n_layers: int = 3,
        hn_lr: float = 0.005,
        hn_momentum: float = 0.0,
        hn_weight_decay: float = 0.0,
        heur_k: int = 0,
        seed: int = 0,
    ) -> None:
        self.layer_names = list(layers)
        keys = [k for ks in layers.values() for k in ks]
        shapes = {k: tuple(np.asarray(initial[k]).shape) for k in keys}
        self.store = ModelStore(store_dir, shapes, num_clients, {k: initial[k] for k in keys})
        self.bounds = [
            (self.store.offsets[ks[0]][0], self.store.offsets[ks[-1]][1]) for ks in layers.values()
        ]
        self.num_clients, self.heur_k = num_clients, heur_k
        self.hnets: list[LayerHypernet] = []
        with torch.random.fork_rng(devices=[]):
            for i in range(num_clients):
                torch.manual_seed(seed * 1_000_003 + i)
                self.hnets.append(LayerHypernet(i, num_clients, len(layers), embed_dim, hidden, n_layers))
        self.optimizers = [HypernetSGD(h, hn_lr, hn_momentum, hn_weight_decay) for h in self.hnets]

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def hypernet_parameters(self) -> int:
        return sum(p.numel() for h in self.hnets for p in h.parameters())

    # ------------------------------------------------------------------ α and θ̄

    def local_layers(self, client: int) -> list[int]:
        """HeurpFedLA: the ``heur_k`` layers with the largest self weight (ties: lower index)."""
        if self.heur_k <= 0:
            return []
        with torch.no_grad():
            self_weight = self.hnets[client]()[:, client].numpy()
        return sorted(np.argsort(-self_weight, kind="stable")[: self.heur_k].tolist())

    def weights(self, client: int) -> np.ndarray:
        """α_i this round (``[L, N]``, float64; kept-local layers one-hot)."""
        with torch.no_grad():
            return self.hnets[client](self.local_layers(client)).numpy().astype(np.float64)

    def personalized_flat(self, client: int, versions: Sequence[int] | None = None) -> np.ndarray:
        """θ̄_i as a flat float32 vector, streaming over the stored models (``versions``: which)."""
        alpha = self.weights(client)
        acc = np.zeros(self.store.size, dtype=np.float64)
        for j in range(self.num_clients):
            col = alpha[:, j]
            if not col.any():
                continue
            theta = self.store.read(j, versions)
            for layer, (a, b) in enumerate(self.bounds):
                if col[layer]:
                    acc[a:b] += col[layer] * theta[a:b]
        return acc.astype(np.float32)

    def personalized(self, client: int, versions: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """θ̄_i by state-dict key."""
        return self.store.unflatten(self.personalized_flat(client, versions))

    # ------------------------------------------------------------------ the update

    def alpha_gradient(self, delta: np.ndarray, versions: Sequence[int] | None = None) -> np.ndarray:
        """``G[l, j] = <θ_j^l, Δ^l>`` (float64, ``[L, N]``), streaming over the stored models."""
        grad = np.zeros((self.num_layers, self.num_clients))
        starts = np.array([a for a, _ in self.bounds])
        for j in range(self.num_clients):  # elementwise + reduceat: no BLAS threads on a busy server
            grad[:, j] = np.add.reduceat(self.store.read(j, versions) * delta, starts)
        return grad

    def update(
        self,
        client: int,
        returned: Mapping[str, np.ndarray] | np.ndarray,
        version: int,
        versions: Sequence[int] | None = None,
    ) -> None:
        """One descent step of HN_i from ``Δ_i = θ̄_i − returned`` (θ̄_i as computed from the
        store at ``versions``, i.e. what was sent), then store ``returned`` as θ_i (``version``)."""
        flat = returned if isinstance(returned, np.ndarray) else self.store.flatten(returned)
        sent = self.personalized_flat(client, versions)
        delta = sent.astype(np.float64) - flat.astype(np.float64)
        grad = self.alpha_gradient(delta, versions)
        hn = self.hnets[client]
        hn.zero_grad(set_to_none=True)
        alpha = hn(self.local_layers(client))
        if alpha.requires_grad:
            alpha.backward(torch.as_tensor(grad, dtype=torch.float32))
            self.optimizers[client].step()
            hn.zero_grad(set_to_none=True)  # N hypernetworks: do not keep N gradients alive
        self.store.write(client, flat, version)

    # ------------------------------------------------------------------ checkpoints

    def state_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for i, (hn, opt) in enumerate(zip(self.hnets, self.optimizers, strict=True)):
            out.update({f"hn.{i}.{k}": v.detach().numpy().copy() for k, v in hn.state_dict().items()})
            out.update({f"opt.{i}.{k}": v for k, v in opt.state_arrays().items()})
        return out

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray], versions: Sequence[int]) -> None:
        """Restore hypernetworks, optimizer states and the store's versions (checked)."""
        for i, (hn, opt) in enumerate(zip(self.hnets, self.optimizers, strict=True)):
            own = hn.state_dict()
            prefix = f"hn.{i}."
            saved = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            if set(saved) != set(own) or any(tuple(saved[k].shape) != tuple(own[k].shape) for k in own):
                raise ValueError(f"server.resume: hypernetwork {i} of the checkpoint does not fit this run")
            hn.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in saved.items()})
            prefix = f"opt.{i}."
            opt.load_state_arrays({k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)})
        self.store.restore(versions)
