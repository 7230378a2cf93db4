"""A character Transformer for next-character prediction, built from the ViT's timm ``Block``.

``CharTransformer`` mirrors timm's ``VisionTransformer`` layout so every method (and FedTP's
per-block ``attn.qkv``) sees the same parameter-group paths:

================  ===============================================================
``token_embed``  ``nn.Embedding(vocab, dim)``: the input layer, in group ``patch_embed``
``pos_embed``    learned ``(1, seq_len, dim)`` position embedding (group ``pos_embed``)
``blocks.<i>``   timm ``Block`` (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp``)
``norm``         final LayerNorm (groups ``norm`` and ``head``)
``head``         ``Linear(dim, vocab)`` on the **last** position: the next character
================  ===============================================================

Attention is bidirectional (no causal mask): the model makes one prediction per sequence,
the character after the whole window, so no position may "see the future" of its target.
This keeps each block exactly the ViT's block (FLOPs as for a ViT with ``seq_len`` tokens).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn


class CharTransformer(nn.Module):
    """``int64 (B, seq_len)`` character indices -> ``(B, vocab)`` logits of the next character."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        embed_dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.vocab_size, self.seq_len, self.embed_dim = vocab_size, seq_len, embed_dim
        self.token_embed = nn.Embedding(vocab_size, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(
            *(
                Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rates[i])
                for i in range(depth)
            )
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)  # as timm's ViT
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, vocab_size)
        self._init_weights()

    def _init_weights(self) -> None:
        """timm ViT-style: truncated normal (std 0.02) for embeddings and linears, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.token_embed.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def extra_parameter_groups(self) -> dict[str, list[str]]:
        """The token embedding is the input layer: group ``patch_embed`` (see fedvit.params)."""
        return {"patch_embed": ["token_embed"]}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` indices -> ``(B, L, dim)`` normalized token features."""
        if x.dim() != 2 or x.shape[1] != self.seq_len:
            raise ValueError(f"expected (batch, {self.seq_len}) character indices, got {tuple(x.shape)}")
        x = self.pos_drop(self.token_embed(x) + self.pos_embed)
        return self.norm(self.blocks(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the next character from the last position's features."""
        return self.head(self.head_drop(x[:, -1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
