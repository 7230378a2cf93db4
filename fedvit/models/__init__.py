"""Models: a timm Vision Transformer built from config, with optional plugins (K/V prefixes)."""

from fedvit.models.vit import build_model, build_vit, load_pretrained

__all__ = ["build_model", "build_vit", "load_pretrained"]
