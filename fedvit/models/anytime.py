"""Anytime inference: attention-based adapters with early exits on a frozen ViT backbone.

After "Federated Learning for Inference at Anytime and Anywhere" (Liu et al., 2022), whose code
is not public; the module follows the closest public code, ReeFL (per-block exits that read the
class tokens of the layers so far, with a learned client token). What we chose:

* **Backbone**: timm's ``VisionTransformer`` (same state-dict keys as the plain model, so a
  ``fedvit pretrain`` file loads into it), frozen (``requires_grad=False``), parameter group
  ``backbone``. Its own final norm and head are kept but unused: every prediction is an exit's.
* **Adapter with exit at depth d** (:class:`ExitAdapter`, module ``adapters.<d>``, group
  ``adapter``; ``d`` counts blocks run, 1-based): after block ``d`` it reads the sequence
  ``[client token, W_in c_e1, ..., W_in c_d]`` (``c_e`` = the class token the backbone produced
  at each exit so far, ``W_in``: ``embed_dim -> width``) plus a learned slot embedding, runs one
  pre-norm Transformer layer of width ``width`` (timm ``Block``) and takes the output at the last
  slot, ``z_d``. The exit's prediction is ``exit_head(z_d)``; the class token that enters block
  ``d + 1`` is ``c_d + W_out z_d``. ``W_out`` starts at zero, so at initialization (and whenever
  ``W_out = 0``: "zero modulation") the backbone's features are exactly the plain ViT's.
* **Shared exit head** (:class:`ExitHead`, ``exit_head``, group ``exit``): ``LayerNorm(width)``
  then ``Linear(width, classes)``, the same for every exit.
* **Client token** (:class:`ClientToken`, ``client_token``, group ``client_token``): one learned
  ``width`` vector read by every adapter; the method YAML keeps it private (personal).
* **Depth cap** (``max_depth``): a device tier runs blocks only up to its deepest exit
  ``<= max_depth``; blocks and adapters beyond it are never computed.

``forward`` returns the deepest exit's logits; :meth:`AnytimeViT.forward_exits` returns every
exit's logits (shallow to deep).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

PLUGIN_MODULES = ("adapters", "exit_head", "client_token")
_ADAPTER_KEY = re.compile(r"^adapters\.(\d+)\.")


def adapter_depth(key: str) -> int | None:
    """The exit depth of an adapter's state-dict key (``adapters.<d>.…``), else ``None``."""
    match = _ADAPTER_KEY.match(key)
    return int(match.group(1)) if match else None


def keys_up_to(keys: Sequence[str], depth: int) -> tuple[str, ...]:
    """The keys a client of max depth ``depth`` holds: every non-adapter key and adapters ``<= depth``."""
    return tuple(k for k in keys if (d := adapter_depth(k)) is None or d <= depth)


def client_tier(tiers: Sequence[int], client_id: int, full_depth: int) -> int:
    """Client ``client_id``'s configured max depth (``model.anytime.tiers``): ``tiers[client_id %
    len(tiers)]``, or ``full_depth`` when no tiers are configured. The client (a device may declare
    its own) and the server (before the client has reported) both start from it."""
    return int(tiers[client_id % len(tiers)]) if tiers else full_depth


class ClientToken(nn.Module):
    """A learned token (``width``) every adapter reads beside the class tokens."""

    parameter_group = "client_token"

    def __init__(self, width: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, width))
        trunc_normal_(self.token, std=0.02)


class ExitHead(nn.Module):
    """The classifier shared by all exits: ``LayerNorm(width) -> Linear(width, classes)``."""

    parameter_group = "exit"

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(z))


class ExitAdapter(nn.Module):
    """One pre-norm Transformer layer of low width over the class tokens so far (see module doc)."""

    parameter_group = "adapter"

    def __init__(self, dim: int, width: int, heads: int, mlp_ratio: float, slots: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, width)
        self.slot_embed = nn.Parameter(torch.zeros(1, slots + 1, width))  # + the client token
        trunc_normal_(self.slot_embed, std=0.02)
        self.layer = Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True)
        self.proj_out = nn.Linear(width, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, history: list[torch.Tensor], client_token: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``history``: class tokens ``(B, dim)`` at each exit so far (this one last).
        Returns ``(z (B, width), modulation (B, dim))``."""
        h = self.proj_in(torch.stack(history, dim=1))
        tok = client_token.to(h.dtype).expand(h.shape[0], 1, -1)
        out = self.layer(torch.cat([tok, h], dim=1) + self.slot_embed)
        z = out[:, -1]
        return z, self.proj_out(z)


class AnytimeViT(VisionTransformer):
    """A timm ViT (frozen) with an :class:`ExitAdapter` at each exit depth and a shared head."""

    def __init__(
        self,
        *,
        exits: Sequence[int] | None = None,
        width: int = 32,
        heads: int = 2,
        mlp_ratio_adapter: float = 2.0,
        **vit_kwargs: Any,
    ) -> None:
        super().__init__(**vit_kwargs)  # first: the backbone's init does not depend on the adapters
        if self.cls_token is None:
            raise ValueError("anytime adapters need a class token")
        depth = len(self.blocks)
        self.exit_depths = tuple(sorted(exits)) if exits else tuple(range(1, depth + 1))
        if not all(1 <= d <= depth for d in self.exit_depths):
            raise ValueError(f"exit depths must be in [1, {depth}], got {self.exit_depths}")
        self.max_depth: int | None = None
        self.client_token = ClientToken(width)
        self.adapters = nn.ModuleDict(
            {
                str(d): ExitAdapter(self.embed_dim, width, heads, mlp_ratio_adapter, slots=i + 1)
                for i, d in enumerate(self.exit_depths)
            }
        )
        self.exit_head = ExitHead(width, self.num_classes)
        for name, p in self.named_parameters():
            if name.split(".")[0] not in PLUGIN_MODULES:
                p.requires_grad_(False)

    def extra_parameter_groups(self) -> dict[str, list[str]]:
        """``backbone``: every module path of the plain ViT (nothing of the plugins)."""
        paths = [n for n, _ in self.named_children() if n not in PLUGIN_MODULES]
        paths += [n for n, _ in self.named_parameters(recurse=False)]
        return {"backbone": paths}

    def active_exits(self, depth: int | None = None) -> tuple[int, ...]:
        """The exits run under ``depth`` and the model's ``max_depth`` (both ``None``: all)."""
        caps = [c for c in (depth, self.max_depth) if c is not None]
        cap = min(caps) if caps else len(self.blocks)
        exits = tuple(d for d in self.exit_depths if d <= cap)
        if not exits:
            raise ValueError(f"no exit at depth <= {cap} (exits: {self.exit_depths})")
        return exits

    def truncate(self, depth: int) -> None:
        """Drop every block and adapter deeper than exit ``depth`` (an export cut at that exit)."""
        if depth not in self.exit_depths:
            raise ValueError(f"no exit at depth {depth} (exits: {self.exit_depths})")
        self.blocks = self.blocks[:depth]
        for d in self.exit_depths:
            if d > depth:
                del self.adapters[str(d)]
        self.exit_depths = tuple(d for d in self.exit_depths if d <= depth)
        self.max_depth = depth

    def forward_exits(self, x: torch.Tensor, depth: int | None = None) -> list[torch.Tensor]:
        """Logits of every exit up to ``depth`` (and ``max_depth``), shallow to deep."""
        exits = self.active_exits(depth)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        history: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        for i in range(exits[-1]):
            x = self.blocks[i](x)
            if i + 1 in exits:
                c = x[:, 0]
                history.append(c)
                z, delta = self.adapters[str(i + 1)](history, self.client_token.token)
                logits.append(self.exit_head(z))
                x = torch.cat([(c + delta)[:, None], x[:, 1:]], dim=1)
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest active exit's logits."""
        return self.forward_exits(x)[-1]
