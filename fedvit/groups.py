"""The names of parameter groups, without torch: what ``method.private`` may name.

:mod:`fedvit.params` maps these names to a model's state-dict keys; the configuration checks
names here (:func:`is_known_group`), so ``load_config`` needs no torch.
"""

from __future__ import annotations

import re

LAYER_TYPES = ("patch_embed", "pos_embed", "norm", "attn", "mlp", "head")
PLUGIN_GROUPS = ("prefix", "adapter", "exit", "client_token", "backbone")
KNOWN_GROUP_PATTERNS = (
    *LAYER_TYPES,
    "classifier",
    "attn.qkv",
    "attn.proj",
    "block.<i>",
    "all",
    *PLUGIN_GROUPS,
)
_BLOCK_RE = re.compile(r"^block\.(-?\d+)$")


def is_known_group(name: str, depth: int) -> bool:
    """Whether ``name`` is a valid group for a model with ``depth`` blocks."""
    if name in KNOWN_GROUP_PATTERNS:
        return True
    match = _BLOCK_RE.match(name)
    return bool(match) and -depth <= int(match.group(1)) < depth
