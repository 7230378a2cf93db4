"""K/V prefixes for self-attention: FedPerfix's local adapters and vanilla prefix-tuning.

Both plugins change only the keys and values of a block's self-attention; the queries, the
attention projections and everything else of the block are the plain timm ``Block``.

* :class:`KVAdapter` (FedPerfix, Sun et al., ICCV 2023): a per-block module that computes the
  prefixes **from the attention's input** (the block input after ``norm1``, which is what the
  authors' released code feeds it): ``down (dim -> mid) -> tanh -> up (mid -> 2 * attn_dim)``.
  Its output, times a scale ``s``, is added per token to K (first half) and V (second half);
  Q gets nothing. This is the authors' "parallel attention" form: ``qkv(x) + s * [0, kv(x)]``.
  Default ``nn.Linear`` initialization, as in their code.
* :class:`PrefixTokens` (prefix-tuning, Li & Liang 2021): ``length`` learned key vectors and
  ``length`` learned value vectors per block (random normal initialization, std 0.02),
  prepended to the keys and values, so every query also attends to them.

:class:`PrefixBlock` wraps an existing timm ``Block`` and reuses its modules, so a model with
prefixes has the plain model's state-dict keys plus ``blocks.<i>.kv_adapter.*`` (parameter
group ``adapter``) or ``blocks.<i>.kv_prefix.*`` (group ``prefix``). :func:`add_prefixes`
installs them on the last ``depth`` blocks (the authors' ``prefix_depth``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import nn

from fedvit.config import PREFIX_KINDS


class KVAdapter(nn.Module):
    """FedPerfix's prefix generator: a per-token additive offset for K and V."""

    parameter_group = "adapter"

    def __init__(self, dim: int, attn_dim: int, mid: int, scale: float) -> None:
        super().__init__()
        self.attn_dim = attn_dim
        self.scale = scale
        self.down = nn.Linear(dim, mid)
        self.act = nn.Tanh()
        self.up = nn.Linear(mid, 2 * attn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, dim) -> (B, N, 2 * attn_dim)``: the scaled offsets ``[dK, dV]``."""
        return self.scale * self.up(self.act(self.down(x)))


class PrefixTokens(nn.Module):
    """Learned prefix keys and values (``length`` of each) for one block."""

    parameter_group = "prefix"

    def __init__(self, attn_dim: int, length: int) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(2, length, attn_dim))
        nn.init.normal_(self.tokens, std=0.02)

    def kv(self, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys and values shaped ``(1, heads, length, head_dim)`` (a method, not
        ``forward``: its output is parameter views, not an activation)."""
        two, length, attn_dim = self.tokens.shape
        kv = self.tokens.reshape(two, 1, length, num_heads, attn_dim // num_heads).transpose(2, 3)
        return kv[0], kv[1]


def prefixed_attention(
    attn: Attention,
    x: torch.Tensor,
    kv_offset: torch.Tensor | None = None,
    kv_tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """timm's ``Attention.forward`` (no mask) with optional K/V offsets or prefix tokens.

    ``kv_offset`` ``(B, N, 2 * attn_dim)`` is added to the K and V parts of ``qkv(x)``;
    ``kv_tokens`` (keys, values ``(1, H, L, head_dim)``) are prepended to K and V. With
    neither, the computation is exactly timm's.
    """
    B, N, _ = x.shape
    qkv = attn.qkv(x)
    if kv_offset is not None:
        qkv = qkv + F.pad(kv_offset, (attn.attn_dim, 0))  # nothing is added to Q
    qkv = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if kv_tokens is not None:
        pk, pv = kv_tokens
        k = torch.cat([pk.expand(B, -1, -1, -1).to(k.dtype), k], dim=2)
        v = torch.cat([pv.expand(B, -1, -1, -1).to(v.dtype), v], dim=2)
    if attn.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        q = q * attn.scale
        weights = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        x = attn.attn_drop(weights) @ v
    x = x.transpose(1, 2).reshape(B, N, attn.attn_dim)
    x = attn.norm(x)
    x = attn.proj(x)
    return attn.proj_drop(x)


class PrefixBlock(nn.Module):
    """A timm ``Block`` whose self-attention gets K/V prefixes from ``kv_adapter`` or ``kv_prefix``.

    The wrapped block's modules are reused under the same names, so its state-dict keys are
    unchanged; the plugin adds its own keys.
    """

    def __init__(self, block: Block, plugin: KVAdapter | PrefixTokens) -> None:
        super().__init__()
        if getattr(block.attn, "gate", None) is not None:
            raise ValueError("prefixes do not support gated attention")
        for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
            setattr(self, name, getattr(block, name))
        if isinstance(plugin, KVAdapter):
            self.kv_adapter = plugin
        else:
            self.kv_prefix = plugin

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("PrefixBlock does not take attention masks")
        h = self.norm1(x)
        if hasattr(self, "kv_adapter"):
            a = prefixed_attention(self.attn, h, kv_offset=self.kv_adapter(h))
        else:
            a = prefixed_attention(self.attn, h, kv_tokens=self.kv_prefix.kv(self.attn.num_heads))
        x = x + self.drop_path1(self.ls1(a))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def add_prefixes(
    model: nn.Module, kind: str, depth: int | None, mid: int, scale: float, length: int
) -> list[int]:
    """Wrap the last ``depth`` blocks of ``model`` (all when ``None``) in :class:`PrefixBlock`.

    Returns the indices of the wrapped blocks. ``kind`` is ``fedperfix`` (adapters of width
    ``mid`` scaled by ``scale``) or ``vanilla`` (``length`` prefix tokens).
    """
    if kind not in PREFIX_KINDS[1:]:
        raise ValueError(f"prefix kind must be one of {PREFIX_KINDS[1:]}, got '{kind}'")
    n = len(model.blocks)
    chosen = list(range(n - (n if depth is None else depth), n))
    for i in chosen:
        block = model.blocks[i]
        attn_dim = block.attn.attn_dim
        if kind == "fedperfix":
            plugin: KVAdapter | PrefixTokens = KVAdapter(
                block.norm1.normalized_shape[0], attn_dim, mid, scale
            )
        else:
            plugin = PrefixTokens(attn_dim, length)
        model.blocks[i] = PrefixBlock(block, plugin)
    return chosen
