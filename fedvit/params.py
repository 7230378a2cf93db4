"""Named parameter groups and the shared / private split of a model.

A *group* is a set of state-dict keys chosen by **exact module paths**: a key belongs to a
module path ``P`` when it equals ``P`` (a parameter held directly by the root, such as
``pos_embed``) or starts with ``P + "."``. Substring matching is never used, so
``blocks.1`` does not catch ``blocks.10``.

ViT groups (timm ``VisionTransformer``; ``i`` runs over blocks):

==============  =============================================================
``patch_embed``  ``patch_embed``
``pos_embed``    ``pos_embed``, ``cls_token`` (and ``reg_token``)
``norm``         ``blocks.i.norm1``, ``blocks.i.norm2``, ``norm``, ``fc_norm``
``attn``         ``blocks.i.attn`` (qkv and output projection), ``blocks.i.ls1``
``attn.qkv``     ``blocks.i.attn.qkv``
``attn.proj``    ``blocks.i.attn.proj``
``mlp``          ``blocks.i.mlp``, ``blocks.i.ls2``
``head``         ``head`` and the pre-head norm (``norm``, ``fc_norm``)
``classifier``   ``head`` alone (the linear classifier, without the pre-head norm)
``block.<i>``    ``blocks.i`` (``block.-1`` is the last block)
``all``          every key (the "Local" baseline keeps everything private)
==============  =============================================================

Plugin modules (prefixes, adapters, exits) name their group with a class attribute
``parameter_group`` (e.g. ``blocks.3.kv_adapter`` of :class:`fedvit.models.prefix.KVAdapter`
is in group ``adapter``); a model may also declare further groups with a method
``extra_parameter_groups() -> dict[str, list[str]]`` returning module paths.

The :class:`ParameterSplit` is the one place that defines what leaves a client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedvit.groups import KNOWN_GROUP_PATTERNS, LAYER_TYPES, PLUGIN_GROUPS, is_known_group  # noqa: F401


class UpdateError(ValueError):
    """Arrays that do not fit the expected split (names, shapes, dtype or values)."""


def _vit_module_paths(depth: int) -> dict[str, list[str]]:
    blocks = [f"blocks.{i}" for i in range(depth)]
    groups = {
        "patch_embed": ["patch_embed"],
        "pos_embed": ["pos_embed", "cls_token", "reg_token"],
        "norm": [p for b in blocks for p in (f"{b}.norm1", f"{b}.norm2")] + ["norm", "fc_norm"],
        "attn": [p for b in blocks for p in (f"{b}.attn", f"{b}.ls1")],
        "attn.qkv": [f"{b}.attn.qkv" for b in blocks],
        "attn.proj": [f"{b}.attn.proj" for b in blocks],
        "mlp": [p for b in blocks for p in (f"{b}.mlp", f"{b}.ls2")],
        "head": ["head", "norm", "fc_norm"],
        "classifier": ["head"],
        "all": [""],
    }
    for i, b in enumerate(blocks):
        groups[f"block.{i}"] = [b]
    return groups


def _matches(key: str, path: str) -> bool:
    return path == "" or key == path or key.startswith(path + ".")


def model_depth(model: nn.Module) -> int:
    """Number of transformer blocks (``model.blocks``)."""
    blocks = getattr(model, "blocks", None)
    return len(blocks) if blocks is not None else 0


def parameter_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Every named group of ``model`` as a tuple of state-dict keys (state-dict order)."""
    depth = model_depth(model)
    paths = _vit_module_paths(depth)
    for path, module in model.named_modules():
        group = getattr(type(module), "parameter_group", None)
        if group is not None:
            paths.setdefault(group, []).append(path)
    extra = getattr(model, "extra_parameter_groups", None)
    if callable(extra):
        for name, mod_paths in extra().items():
            paths.setdefault(name, []).extend(mod_paths)
    keys = list(model.state_dict().keys())
    groups = {
        name: tuple(k for k in keys if any(_matches(k, p) for p in mod_paths))
        for name, mod_paths in paths.items()
    }
    for i in range(depth):  # negative block aliases
        groups[f"block.{i - depth}"] = groups[f"block.{i}"]
    return groups


@dataclass(frozen=True)
class ParameterSplit:
    """Which state-dict keys are shared (sent, aggregated) and which stay on the client."""

    shared: tuple[str, ...]
    private: tuple[str, ...]
    private_groups: tuple[str, ...] = ()

    @classmethod
    def from_model(cls, model: nn.Module, private_groups: Iterable[str]) -> ParameterSplit:
        """Split ``model`` so that the union of ``private_groups`` stays private."""
        groups = parameter_groups(model)
        private_groups = tuple(private_groups)
        private: set[str] = set()
        for name in private_groups:
            if name not in groups:
                raise ValueError(f"unknown parameter group '{name}'; this model has {sorted(groups)}")
            private.update(groups[name])
        keys = list(model.state_dict().keys())
        return cls(
            shared=tuple(k for k in keys if k not in private),
            private=tuple(k for k in keys if k in private),
            private_groups=private_groups,
        )

    def shapes(self, model: nn.Module, which: str = "shared") -> dict[str, tuple[int, ...]]:
        """Expected shape of each key of the ``shared`` or ``private`` part."""
        sd = model.state_dict()
        return {k: tuple(sd[k].shape) for k in getattr(self, which)}


def get_arrays(model: nn.Module, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Copy the given state-dict entries out as numpy arrays (in ``keys`` order)."""
    sd = model.state_dict()
    return {k: sd[k].detach().cpu().numpy().copy() for k in keys}


def set_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load ``arrays`` into ``model`` in place (keys must exist; shapes must match)."""
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in arrays.items():
            v = np.asarray(v)
            if not v.flags.writeable:  # a view of a message's bytes (fedvit.wire): torch wants to own it
                v = v.copy()
            sd[k].copy_(torch.as_tensor(v, dtype=sd[k].dtype))


def check_arrays(
    arrays: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    who: str,
) -> None:
    """Raise :class:`UpdateError` unless ``arrays`` has exactly the expected keys and shapes
    and only finite floating-point values. ``who`` names the sender in the message."""
    got, want = set(arrays), set(expected)
    if got != want:
        unknown, missing = sorted(got - want), sorted(want - got)
        raise UpdateError(
            f"{who}: wrong parameter names (unknown: {unknown[:5]}{'...' if len(unknown) > 5 else ''}, "
            f"missing: {missing[:5]}{'...' if len(missing) > 5 else ''})"
        )
    for k, v in arrays.items():
        if tuple(v.shape) != tuple(expected[k]):
            raise UpdateError(f"{who}: '{k}' has shape {tuple(v.shape)}, expected {tuple(expected[k])}")
        if not np.issubdtype(v.dtype, np.floating):
            raise UpdateError(f"{who}: '{k}' has dtype {v.dtype}, expected a floating-point type")
        if not np.isfinite(v).all():
            raise UpdateError(f"{who}: '{k}' holds NaN or Inf values")


def count(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Number of scalars in a set of shapes."""
    return int(sum(int(np.prod(s)) for s in shapes.values()))
