"""The configurable Vision Transformer (timm's ``VisionTransformer``) and the model dispatcher:
:func:`build_model` builds ``model.arch`` (``vit``, or ``char-transformer`` from
:mod:`fedvit.models.char`), :func:`example_input` is one input of the right shape and dtype."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fedvit.config import ConfigError, FedvitConfig, model_img_size, model_input_shape
from fedvit.models.char import CharTransformer
from fedvit.models.prefix import add_prefixes
from fedvit.params import parameter_groups

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
    return dict(
        img_size=model_img_size(cfg),
        patch_size=cfg.model.patch_size,
        in_chans=cfg.data.in_chans,
        num_classes=cfg.data.num_classes,
        **_trunk_kwargs(cfg),
    )


def _trunk_kwargs(cfg: FedvitConfig) -> dict:
    """The Transformer trunk's arguments (width, depth, heads, MLP, dropout), common to both models."""
    m = cfg.model
    return dict(
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
    return CharTransformer(vocab_size=cfg.data.num_classes, seq_len=cfg.data.seq_len, **_trunk_kwargs(cfg))


BUILDERS = {"vit": build_vit, "char-transformer": build_char_transformer}


def example_input(cfg: FedvitConfig, batch: int = 1) -> torch.Tensor:
    """Zeros shaped and typed as ``batch`` model inputs: float images or ``int64`` character indices."""
    dtype = torch.int64 if cfg.model.arch == "char-transformer" else torch.float32
    return torch.zeros((batch, *model_input_shape(cfg)), dtype=dtype)


TIMM_PREFIX = "timm:"


def timm_name(pretrained: str | None) -> str | None:
    """``<name>`` of ``model.pretrained='timm:<name>'``; None for a local file (or nothing)."""
    if pretrained and pretrained.startswith(TIMM_PREFIX):
        return pretrained[len(TIMM_PREFIX) :]
    return None


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load a local state dict (``torch.save`` file; a ``{"model": sd}`` wrapper works too), or
    timm's pretrained weights for ``timm:<name>`` (:func:`load_timm_pretrained`).

    Keys whose shape differs (e.g. a head for another number of classes) are skipped and
    returned, so a backbone trained on one dataset can start a federation on another.
    """
    name = timm_name(str(path))
    if name is not None:
        return load_timm_pretrained(model, name)
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
    return _load_matching(model, state)


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load the tensors of ``state`` whose shape is the model's; return the other keys (fresh init)."""
    own = model.state_dict()
    skipped = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    if skipped:
        log.info("pretrained: kept the fresh init for %s (shape differs)", skipped)
    return skipped


@functools.lru_cache(maxsize=2)
def timm_pretrained_state(name: str) -> tuple[dict[str, torch.Tensor], int, bool]:
    """timm's pretrained ``VisionTransformer`` ``name`` loaded by ``timm.create_model(name,
    pretrained=True)`` (Hugging Face hub or its local cache; ``HF_HUB_OFFLINE=1``: the cache only):
    its state dict, prefix tokens and ``no_embed_class``. Cached per process (clients rebuild models)."""
    import timm
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    spec = f"{TIMM_PREFIX}{name}"
    try:
        src = timm.create_model(name, pretrained=True)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise ConfigError(
            f"key 'model.pretrained': the weights of {spec} are not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and {offline} (no network); fetch them once where the hub is "
            f"reachable (timm.create_model('{name}', pretrained=True)) and point HF_HOME at that cache"
        ) from err
    except (OSError, RuntimeError) as err:
        raise ConfigError(f"key 'model.pretrained': cannot load {spec}: {type(err).__name__}: {err}") from err
    if not isinstance(src, VisionTransformer):
        raise ConfigError(
            f"key 'model.pretrained': {spec} is a {type(src).__name__}, not a timm VisionTransformer"
        )
    state = {k: v.detach().clone() for k, v in src.state_dict().items()}
    return state, src.num_prefix_tokens, bool(src.no_embed_class)


def load_timm_pretrained(model: nn.Module, name: str) -> list[str]:
    """Load timm's pretrained ViT ``name`` into fedvit's ViT ``model`` (itself a timm
    ``VisionTransformer``) and return the keys that kept the fresh init.

    timm's own ``checkpoint_filter_fn`` resamples the patch embedding (``resample_patch_embed``) and
    the position embedding (``resample_abs_pos_embed``) to ``model``'s patch and grid, and
    ``adapt_input_conv`` maps RGB filters to ``data.in_chans``; tensors of another shape (another
    width, a head for other classes) keep the fresh init; blocks beyond ``model.depth`` and other
    keys ``model`` lacks are left out. Nothing matching at all is an error.
    """
    from timm.models import adapt_input_conv
    from timm.models.vision_transformer import checkpoint_filter_fn

    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"key 'model.pretrained': timm weights need model.arch 'vit', got {type(model).__name__}"
        )
    state, prefix_tokens, no_embed_class = timm_pretrained_state(name)
    state = dict(state)
    if (prefix_tokens, no_embed_class) != (model.num_prefix_tokens, bool(model.no_embed_class)):
        state.pop("pos_embed", None)  # another token layout (register tokens, no class token)
    state = checkpoint_filter_fn(state, model)
    w = state.get("patch_embed.proj.weight")
    in_chans = model.patch_embed.proj.weight.shape[1]
    if w is not None and w.shape[1] != in_chans:
        state["patch_embed.proj.weight"] = adapt_input_conv(in_chans, w)
    own = model.state_dict()
    left_out = sorted(set(state) - set(own))
    state = {k: v for k, v in state.items() if k in own}
    skipped = _load_matching(model, state)
    if len(skipped) == len(state):
        raise ConfigError(
            f"key 'model.pretrained': no tensor of {TIMM_PREFIX}{name} fits this model "
            f"(model.embed_dim {model.embed_dim} as the timm model's?)"
        )
    if left_out:
        log.info(
            "pretrained: %s: left out %d tensors this model lacks (%s ...)", name, len(left_out), left_out[:3]
        )
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
    freeze(model, cfg.model.frozen)
    return model


def freeze(model: nn.Module, groups: list[str]) -> None:
    """``requires_grad=False`` for every parameter of the named groups (``model.frozen``); every
    client's optimizer then leaves them as built (or as loaded from ``model.pretrained``)."""
    if not groups:
        return
    named = parameter_groups(model)
    keys = {k for g in groups for k in named[g]}
    for name, p in model.named_parameters():
        if name in keys:
            p.requires_grad_(False)
