"""Models: a timm Vision Transformer built from config (plugins join later)."""

from fedvit.models.vit import build_model, build_vit, load_pretrained

__all__ = ["build_model", "build_vit", "load_pretrained"]
