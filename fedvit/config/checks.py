"""The config's vocabularies (the values a key may take) and its one check: a failed check raises
:class:`~fedvit.errors.ConfigError` naming the key."""

from __future__ import annotations

from fedvit.errors import ConfigError

PARTITION_KINDS = ("iid", "dirichlet", "pathological", "natural")
DATA_SOURCES = ("sklearn-digits", "parquet", "medmnist-npz", "femnist-npz", "hub", "leaf-shakespeare")
TEXT_SOURCES = ("leaf-shakespeare",)
MODALITIES = ("image", "text")
# model.arch -> the data modality it reads.
ARCH_MODALITY = {"vit": "image", "char-transformer": "text"}
OPTIMIZERS = ("sgd", "adamw")
PREFIX_KINDS = ("none", "fedperfix", "vanilla")
# Plugin parameter groups and the plugins that create them (any one of them will do).
PLUGIN_OF_GROUP = {
    "adapter": ("fedperfix", "anytime"),
    "prefix": ("vanilla",),
    "exit": ("anytime",),
    "backbone": ("anytime",),
    "client_token": ("anytime",),
}
PLUGIN_SETTING = {
    "fedperfix": "model.prefix.kind=fedperfix",
    "vanilla": "model.prefix.kind=vanilla",
    "anytime": "model.anytime.enabled=true",
}


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"key '{key}': {msg}")


def check_timm_name(name: str) -> None:
    """``model.pretrained='timm:<name>'`` names a timm model with pretrained weights (no download)."""
    import timm

    try:
        known = timm.is_model(name) and timm.models.get_pretrained_cfg(name) is not None
    except RuntimeError:  # a tag the architecture does not have
        known = False
    check(
        known,
        "model.pretrained",
        f"'timm:{name}': timm has no model '{name}' with pretrained weights "
        "(list them with timm.list_pretrained('vit_*'))",
    )
