"""Models: a timm Vision Transformer or a character Transformer of timm blocks, built from config,
with optional plugins (K/V prefixes)."""

from fedvit.models.char import CharTransformer
from fedvit.models.vit import build_char_transformer, build_model, build_vit, example_input, load_pretrained

__all__ = [
    "CharTransformer",
    "build_char_transformer",
    "build_model",
    "build_vit",
    "example_input",
    "load_pretrained",
]
