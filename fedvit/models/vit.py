"""The configurable Vision Transformer (timm's ``VisionTransformer``) and the model dispatcher:
:func:`build_model` builds ``model.arch`` (``vit``, or ``char-transformer`` from
:mod:`fedvit.models.char`), :func:`example_input` is one input of the right shape and dtype."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fedvit.config import FedvitConfig, model_img_size
from fedvit.models.char import CharTransformer
from fedvit.models.prefix import add_prefixes

log = logging.getLogger(__name__)


def build_vit(cfg: FedvitConfig) -> VisionTransformer:
    """A timm ViT sized by ``cfg.model`` for ``cfg.data`` (channels, classes, image size); with
    ``model.anytime.enabled`` the :class:`~fedvit.models.anytime.AnytimeViT` of the same backbone."""
    a = cfg.model.anytime
    if a.enabled:
        from fedvit.models.anytime import AnytimeViT

        return AnytimeViT(
            exits=a.exits, width=a.width, heads=a.heads, mlp_ratio_adapter=a.mlp_ratio, **vit_kwargs(cfg)
        )
    return VisionTransformer(**vit_kwargs(cfg))


def vit_kwargs(cfg: FedvitConfig) -> dict:
    """The timm ``VisionTransformer`` arguments of ``cfg``."""
    m = cfg.model
    return dict(
        img_size=model_img_size(cfg),
        patch_size=m.patch_size,
        in_chans=cfg.data.in_chans,
        num_classes=cfg.data.num_classes,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        qkv_bias=m.qkv_bias,
        drop_rate=m.drop_rate,
        drop_path_rate=m.drop_path_rate,
    )


def build_char_transformer(cfg: FedvitConfig) -> CharTransformer:
    """A character Transformer sized by ``cfg.model``; vocabulary ``data.num_classes``, ``data.seq_len``."""
    m = cfg.model
    return CharTransformer(
        vocab_size=cfg.data.num_classes,
        seq_len=cfg.data.seq_len,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        qkv_bias=m.qkv_bias,
        drop_rate=m.drop_rate,
        drop_path_rate=m.drop_path_rate,
    )


BUILDERS = {"vit": build_vit, "char-transformer": build_char_transformer}


def example_input(cfg: FedvitConfig, batch: int = 1) -> torch.Tensor:
    """Zeros shaped and typed as ``batch`` model inputs: float images or ``int64`` character indices."""
    if cfg.model.arch == "char-transformer":
        return torch.zeros((batch, cfg.data.seq_len), dtype=torch.int64)
    size = model_img_size(cfg)
    return torch.zeros((batch, cfg.data.in_chans, size, size))


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load a local state dict (``torch.save`` file; a ``{"model": sd}`` wrapper works too).

    Keys whose shape differs (e.g. a head for another number of classes) are skipped and
    returned, so a backbone trained on one dataset can start a federation on another.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: no such file: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"model.pretrained: {path} has keys this model lacks: {unknown[:5]}")
    skipped = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    if skipped:
        log.info("pretrained: kept the fresh init for %s (shape differs)", skipped)
    return skipped


def prefix_mid(cfg: FedvitConfig) -> int:
    """FedPerfix adapter width: ``model.prefix.mid``, else 2/3 of the width (256 for ViT-S)."""
    mid = cfg.model.prefix.mid
    return mid if mid is not None else max(1, 2 * cfg.model.embed_dim // 3)


def build_model(cfg: FedvitConfig) -> nn.Module:
    """Build the model of a run with a seeded initialization.

    Every client and the server build the same initial weights from ``cfg.seed``, so the
    private parts start where the shared parts start (as in FedPer's reference code).
    Plugins (``model.prefix``) are created after the backbone, so a backbone's initial
    weights do not depend on its plugins.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.model.arch not in BUILDERS:
            raise ValueError(f"model.arch must be one of {sorted(BUILDERS)}, got '{cfg.model.arch}'")
        model = BUILDERS[cfg.model.arch](cfg)
        pf = cfg.model.prefix
        if pf.kind != "none":
            add_prefixes(model, pf.kind, pf.depth, prefix_mid(cfg), pf.scale, pf.length)
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained)
    return model
