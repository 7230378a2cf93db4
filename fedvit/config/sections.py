"""The sections of a run's data, model and method (``data``, ``model``, ``method``): typed dataclasses,
each checking itself in ``validate`` given the sections it depends on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedvit.config.checks import (
    ARCH_MODALITY,
    DATA_SOURCES,
    MODALITIES,
    PARTITION_KINDS,
    PLUGIN_OF_GROUP,
    PLUGIN_SETTING,
    PREFIX_KINDS,
    TEXT_SOURCES,
    check,
    check_timm_name,
)


@dataclass
class PartitionConfig:
    """How the training set is split over clients (flwr-datasets partitioners)."""

    kind: str = "dirichlet"  # iid | dirichlet | pathological | natural
    alpha: float = 0.5  # dirichlet concentration
    min_size: int = 10  # dirichlet: minimum training examples per client
    classes_per_client: int = 2  # pathological
    id_key: str = "writer"  # natural: the column holding the natural client id
    self_balancing: bool = False  # dirichlet: a client above the mean size gets no more classes
    # Protocol. false: the train split is partitioned and the official test split is redistributed by
    # each client's labels. true (FedPerfix / PFLlib): the official splits (train, val, test) are
    # pooled, partitioned, and each client's share is split into its own train / test.
    pool: bool = False
    test_fraction: float = 0.25  # pool: share of each client's examples that is its test set

    def validate(self, data: DataConfig) -> None:
        """``data.partition``: a known kind, feasible for ``data``."""
        check(
            self.kind in PARTITION_KINDS,
            "data.partition.kind",
            f"must be one of {PARTITION_KINDS}, got '{self.kind}'",
        )
        check(self.alpha > 0, "data.partition.alpha", f"must be > 0, got {self.alpha}")
        check(self.min_size >= 0, "data.partition.min_size", "must be >= 0")
        check(
            0 < self.test_fraction < 1,
            "data.partition.test_fraction",
            f"must be in (0, 1), got {self.test_fraction}",
        )
        check(
            1 <= self.classes_per_client <= data.num_classes,
            "data.partition.classes_per_client",
            f"must be in [1, data.num_classes={data.num_classes}], got {self.classes_per_client}",
        )
        check(
            self.kind != "natural" or data.source in ("femnist-npz", "hub", *TEXT_SOURCES),
            "data.partition.kind",
            f"'natural' needs a dataset with a natural client id (femnist, shakespeare), not '{data.name}'",
        )


@dataclass
class DataConfig:
    """Where a dataset comes from and how each client's splits are made."""

    name: str = "digits"
    # sklearn-digits | parquet | medmnist-npz | femnist-npz | hub (images) | leaf-shakespeare (text)
    source: str = "sklearn-digits"
    modality: str = "image"  # image | text (token sequences; the image fields below are then unused)
    path: str | None = None  # local file or folder; relative paths are under data_dir
    data_dir: str = "data"  # root for relative local paths
    hub_id: str | None = None  # Hugging Face dataset id (source: hub)
    hub_config: str | None = None  # Hugging Face dataset config name
    image_key: str = "image"
    label_key: str = "label"
    num_classes: int = 10  # text: the vocabulary size (inputs and labels share it)
    seq_len: int = 80  # text: characters per input sequence
    in_chans: int = 1
    image_size: int = 16  # side length images are served at (resized on the fly)
    invert: bool = False  # FEMNIST: LEAF stores white background, dark ink
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    val_fraction: float = 0.1  # share of each client's training partition held out
    test_fraction: float = 0.2  # sources without a test split: share held out as test
    max_train_per_client: int | None = None  # optional cap (quick experiments)
    cache_dir: str | None = None  # partition cache; default ~/.cache/fedvit/partitions
    num_workers: int = 0

    def validate(self) -> None:
        """``data``: a known source of the right modality, consistent image settings, its partition."""
        check(
            self.source in DATA_SOURCES, "data.source", f"must be one of {DATA_SOURCES}, got '{self.source}'"
        )
        check(
            self.modality in MODALITIES,
            "data.modality",
            f"must be one of {MODALITIES}, got '{self.modality}'",
        )
        want = "text" if self.source in TEXT_SOURCES else "image"
        check(
            self.modality == want,
            "data.modality",
            f"data.source '{self.source}' gives {want} data, but data.modality is '{self.modality}'",
        )
        check(self.seq_len >= 1, "data.seq_len", f"must be >= 1, got {self.seq_len}")
        if self.source in TEXT_SOURCES:
            from fedvit.data.text import VOCAB_SIZE  # numpy only: fedvit.data imports lazily

            check(
                self.num_classes == VOCAB_SIZE,
                "data.num_classes",
                f"'{self.source}' uses LEAF's {VOCAB_SIZE}-character vocabulary, got {self.num_classes}",
            )
        if self.source == "hub":
            check(bool(self.hub_id), "data.hub_id", "required when data.source is 'hub'")
        elif self.source != "sklearn-digits":
            check(bool(self.path), "data.path", f"required when data.source is '{self.source}'")
        check(self.num_classes >= 2, "data.num_classes", "must be >= 2")
        check(self.in_chans in (1, 3), "data.in_chans", f"must be 1 or 3, got {self.in_chans}")
        check(self.image_size >= 1, "data.image_size", "must be >= 1")
        check(
            len(self.mean) == self.in_chans,
            "data.mean",
            f"needs {self.in_chans} values, got {len(self.mean)}",
        )
        check(
            len(self.std) == self.in_chans, "data.std", f"needs {self.in_chans} values, got {len(self.std)}"
        )
        check(all(v > 0 for v in self.std), "data.std", "must be > 0")
        check(0 <= self.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        check(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
        if self.max_train_per_client is not None:
            check(self.max_train_per_client >= 1, "data.max_train_per_client", "must be >= 1")
        self.partition.validate(self)


@dataclass
class PrefixConfig:
    """K/V prefixes on self-attention (fedvit.models.prefix): FedPerfix or prefix-tuning."""

    kind: str = "none"  # none | fedperfix (local adapters) | vanilla (learned prefix tokens)
    depth: int | None = None  # prefixes on the last `depth` blocks; None: every block
    mid: int | None = None  # fedperfix adapter width; None: 2/3 of embed_dim (256 for ViT-S)
    scale: float = 1.5  # fedperfix: the adapter output is multiplied by this
    length: int = 8  # vanilla: prefix tokens per block (for K and for V)

    def validate(self, depth: int) -> None:
        """``model.prefix`` of a model with ``depth`` blocks."""
        check(
            self.kind in PREFIX_KINDS,
            "model.prefix.kind",
            f"must be one of {PREFIX_KINDS}, got '{self.kind}'",
        )
        if self.depth is not None:
            check(1 <= self.depth <= depth, "model.prefix.depth", f"must be in [1, model.depth={depth}]")
        if self.mid is not None:
            check(self.mid >= 1, "model.prefix.mid", f"must be >= 1, got {self.mid}")
        check(self.length >= 1, "model.prefix.length", f"must be >= 1, got {self.length}")


@dataclass
class AnytimeConfig:
    """Adapters with early exits on a frozen backbone (fedvit.models.anytime)."""

    enabled: bool = False
    exits: list[int] | None = None  # depths (blocks run, 1-based) with an adapter + exit; None: every block
    width: int = 32  # the adapters' width
    heads: int = 2  # the adapters' attention heads
    mlp_ratio: float = 2.0
    tiers: list[int] = field(default_factory=list)  # client i's max depth: tiers[i % len]; []: full depth

    def validate(self, model: ModelConfig) -> None:
        """``model.anytime``: exits within the depth, tiers at exits, no other plugin."""
        if not self.enabled:
            return
        check(model.arch == "vit", "model.anytime.enabled", f"needs model.arch 'vit', got '{model.arch}'")
        check(model.prefix.kind == "none", "model.anytime.enabled", "cannot be combined with model.prefix")
        exits = self.exits if self.exits is not None else list(range(1, model.depth + 1))
        check(len(exits) >= 1, "model.anytime.exits", "needs at least one exit (or null: every block)")
        check(
            all(1 <= e <= model.depth for e in exits) and len(set(exits)) == len(exits),
            "model.anytime.exits",
            f"must be distinct depths in [1, model.depth={model.depth}], got {list(exits)}",
        )
        check(self.width >= 1 and self.heads >= 1, "model.anytime.width", "width and heads must be >= 1")
        check(
            self.width % self.heads == 0,
            "model.anytime.heads",
            f"{self.heads} does not divide width {self.width}",
        )
        check(self.mlp_ratio > 0, "model.anytime.mlp_ratio", "must be > 0")
        check(
            all(t in exits for t in self.tiers),
            "model.anytime.tiers",
            f"every tier (a client's max depth) must be an exit depth {sorted(exits)}, "
            f"got {list(self.tiers)}",
        )


@dataclass
class ModelConfig:
    """A timm VisionTransformer or a character Transformer of timm blocks (with optional plugins)."""

    name: str = "vit-tiny"
    arch: str = "vit"  # vit (image modality) | char-transformer (text modality)
    img_size: int | None = None  # None: data.image_size (vit only)
    patch_size: int = 4
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    pretrained: str | None = None  # local checkpoint path (state dict), or 'timm:<name>' (timm/HF hub cache)
    # Parameter groups (names as in method.private) that never train: e.g. ['patch_embed',
    # 'pos_embed', 'block.0', ...] on a pretrained backbone leaves a linear probe of the head.
    frozen: list[str] = field(default_factory=list)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    anytime: AnytimeConfig = field(default_factory=AnytimeConfig)

    def validate(self, data: DataConfig) -> None:
        """``model``: an architecture that reads ``data``, consistent shapes, its plugins."""
        check(
            self.arch in ARCH_MODALITY,
            "model.arch",
            f"must be one of {tuple(ARCH_MODALITY)}, got '{self.arch}'",
        )
        check(
            ARCH_MODALITY[self.arch] == data.modality,
            "model.arch",
            f"'{self.arch}' reads {ARCH_MODALITY[self.arch]} data, but data.modality is '{data.modality}' "
            f"(dataset '{data.name}'); use model.arch "
            f"{next(a for a, mod in ARCH_MODALITY.items() if mod == data.modality)!r}",
        )
        if self.arch == "vit":
            img = self.img_size if self.img_size is not None else data.image_size
            check(
                img >= self.patch_size,
                "model.img_size",
                f"{img} is smaller than model.patch_size {self.patch_size}",
            )
            check(
                img % self.patch_size == 0,
                "model.patch_size",
                f"{self.patch_size} does not divide the image size {img}",
            )
        check(self.depth >= 1, "model.depth", "must be >= 1")
        check(
            self.embed_dim % self.num_heads == 0,
            "model.num_heads",
            f"{self.num_heads} does not divide model.embed_dim {self.embed_dim}",
        )
        check(self.mlp_ratio > 0, "model.mlp_ratio", "must be > 0")
        from fedvit.groups import KNOWN_GROUP_PATTERNS, is_known_group

        for group in self.frozen:
            check(
                is_known_group(group, self.depth),
                "model.frozen",
                f"unknown parameter group '{group}'; known: {KNOWN_GROUP_PATTERNS}",
            )
        check(
            0 <= self.drop_rate < 1 and 0 <= self.drop_path_rate < 1, "model.drop_rate", "must be in [0, 1)"
        )
        if self.pretrained and self.pretrained.startswith("timm:"):
            check(
                self.arch == "vit",
                "model.pretrained",
                f"timm weights need model.arch 'vit', got '{self.arch}'",
            )
            check_timm_name(self.pretrained[len("timm:") :])  # the one check that imports timm
        elif self.pretrained:
            check(
                Path(self.pretrained).expanduser().is_file(),
                "model.pretrained",
                f"no such file: {self.pretrained}",
            )
        self.prefix.validate(self.depth)
        self.anytime.validate(self)

    def plugins(self) -> set[str]:
        """The model plugins this config turns on (keys of :data:`PLUGIN_SETTING`, or ``none``)."""
        return {self.prefix.kind} | ({"anytime"} if self.anytime.enabled else set())


@dataclass
class MethodConfig:
    """A pFL method: which groups stay private and which server/client classes run it."""

    name: str = "fedper"
    private: list[str] = field(default_factory=lambda: ["head"])
    strategy: str = "personalized"  # a @register_strategy name (fedvit.registry)
    client: str = "partial"  # a @register_client name (fedvit.registry)
    # Method-specific knobs, typed by the client's / strategy's ``Options`` (fedvit.registry).
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self, model: ModelConfig) -> None:
        """``method``: private groups the model has, a strategy and a client that exist, typed options.

        Nothing of the method is imported: names and ``Options`` classes are read from source
        (:mod:`fedvit.registry`)."""
        from fedvit.groups import KNOWN_GROUP_PATTERNS, is_known_group
        from fedvit.registry import check_method_options, names

        plugins = model.plugins()
        for group in self.private:
            check(
                is_known_group(group, model.depth),
                "method.private",
                f"unknown parameter group '{group}'; known: {KNOWN_GROUP_PATTERNS}",
            )
            needs = PLUGIN_OF_GROUP.get(group)
            check(
                needs is None or bool(plugins & set(needs)),
                "method.private",
                f"group '{group}' needs {' or '.join(PLUGIN_SETTING[k] for k in needs or ())}, "
                f"got model.prefix.kind='{model.prefix.kind}', model.anytime.enabled={model.anytime.enabled}",
            )
        strategies, clients = names("strategy"), names("client")
        check(self.strategy in strategies, "method.strategy", f"must be one of {strategies}")
        check(self.client in clients, "method.client", f"must be one of {clients}")
        check_method_options(self)  # typed method.options: unknown keys, wrong types, bad values
