"""Layered, typed configuration.

A run's configuration is composed from YAML layers in ``conf/`` and then from the Flower
run config (``flwr run . --run-config "..."``)::

    schema defaults (the dataclasses below)
      <- conf/base.yaml
      <- conf/method/<method>.yaml
      <- conf/dataset/<dataset>.yaml
      <- conf/model/<model>.yaml
      <- conf/experiment/<experiment>.yaml   (optional)
      <- Flower run-config keys (``num-server-rounds``, ``alpha`` ...; see RUN_CONFIG_KEYS)
      <- ``overrides`` (an OmegaConf dotlist for any nested key: "train.lr=0.05 model.depth=6")

A Flower run-config value of ``""`` means "not set": the YAML layers decide. Which method,
dataset and model files are read is decided by the selectors ``method.name``, ``data.name``
and ``model.name``: the run config wins over the experiment, which wins over ``base.yaml``.

The composed config is checked against the dataclasses (unknown keys, wrong types) and then
for impossible values; every problem raises one :class:`ConfigError` that names the key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedvit.errors import ConfigError  # users import it from here; defined import-free for low modules


def _find_conf_dir() -> Path:
    """``conf/`` beside the package (source tree, FAB) or inside it (wheel install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "base.yaml").is_file():
            return candidate
    return here.parent / "conf"


CONF_DIR = _find_conf_dir()

# --------------------------------------------------------------------------- schema


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
        _check(
            self.kind in PARTITION_KINDS,
            "data.partition.kind",
            f"must be one of {PARTITION_KINDS}, got '{self.kind}'",
        )
        _check(self.alpha > 0, "data.partition.alpha", f"must be > 0, got {self.alpha}")
        _check(self.min_size >= 0, "data.partition.min_size", "must be >= 0")
        _check(
            0 < self.test_fraction < 1,
            "data.partition.test_fraction",
            f"must be in (0, 1), got {self.test_fraction}",
        )
        _check(
            1 <= self.classes_per_client <= data.num_classes,
            "data.partition.classes_per_client",
            f"must be in [1, data.num_classes={data.num_classes}], got {self.classes_per_client}",
        )
        _check(
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
        _check(
            self.source in DATA_SOURCES, "data.source", f"must be one of {DATA_SOURCES}, got '{self.source}'"
        )
        _check(
            self.modality in MODALITIES,
            "data.modality",
            f"must be one of {MODALITIES}, got '{self.modality}'",
        )
        want = "text" if self.source in TEXT_SOURCES else "image"
        _check(
            self.modality == want,
            "data.modality",
            f"data.source '{self.source}' gives {want} data, but data.modality is '{self.modality}'",
        )
        _check(self.seq_len >= 1, "data.seq_len", f"must be >= 1, got {self.seq_len}")
        if self.source in TEXT_SOURCES:
            from fedvit.data.text import VOCAB_SIZE  # numpy only: fedvit.data imports lazily

            _check(
                self.num_classes == VOCAB_SIZE,
                "data.num_classes",
                f"'{self.source}' uses LEAF's {VOCAB_SIZE}-character vocabulary, got {self.num_classes}",
            )
        if self.source == "hub":
            _check(bool(self.hub_id), "data.hub_id", "required when data.source is 'hub'")
        elif self.source != "sklearn-digits":
            _check(bool(self.path), "data.path", f"required when data.source is '{self.source}'")
        _check(self.num_classes >= 2, "data.num_classes", "must be >= 2")
        _check(self.in_chans in (1, 3), "data.in_chans", f"must be 1 or 3, got {self.in_chans}")
        _check(self.image_size >= 1, "data.image_size", "must be >= 1")
        _check(
            len(self.mean) == self.in_chans,
            "data.mean",
            f"needs {self.in_chans} values, got {len(self.mean)}",
        )
        _check(
            len(self.std) == self.in_chans, "data.std", f"needs {self.in_chans} values, got {len(self.std)}"
        )
        _check(all(v > 0 for v in self.std), "data.std", "must be > 0")
        _check(0 <= self.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        _check(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
        if self.max_train_per_client is not None:
            _check(self.max_train_per_client >= 1, "data.max_train_per_client", "must be >= 1")
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
        _check(
            self.kind in PREFIX_KINDS,
            "model.prefix.kind",
            f"must be one of {PREFIX_KINDS}, got '{self.kind}'",
        )
        if self.depth is not None:
            _check(1 <= self.depth <= depth, "model.prefix.depth", f"must be in [1, model.depth={depth}]")
        if self.mid is not None:
            _check(self.mid >= 1, "model.prefix.mid", f"must be >= 1, got {self.mid}")
        _check(self.length >= 1, "model.prefix.length", f"must be >= 1, got {self.length}")


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
        _check(model.arch == "vit", "model.anytime.enabled", f"needs model.arch 'vit', got '{model.arch}'")
        _check(model.prefix.kind == "none", "model.anytime.enabled", "cannot be combined with model.prefix")
        exits = self.exits if self.exits is not None else list(range(1, model.depth + 1))
        _check(len(exits) >= 1, "model.anytime.exits", "needs at least one exit (or null: every block)")
        _check(
            all(1 <= e <= model.depth for e in exits) and len(set(exits)) == len(exits),
            "model.anytime.exits",
            f"must be distinct depths in [1, model.depth={model.depth}], got {list(exits)}",
        )
        _check(self.width >= 1 and self.heads >= 1, "model.anytime.width", "width and heads must be >= 1")
        _check(
            self.width % self.heads == 0,
            "model.anytime.heads",
            f"{self.heads} does not divide width {self.width}",
        )
        _check(self.mlp_ratio > 0, "model.anytime.mlp_ratio", "must be > 0")
        _check(
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
        _check(
            self.arch in ARCH_MODALITY,
            "model.arch",
            f"must be one of {tuple(ARCH_MODALITY)}, got '{self.arch}'",
        )
        _check(
            ARCH_MODALITY[self.arch] == data.modality,
            "model.arch",
            f"'{self.arch}' reads {ARCH_MODALITY[self.arch]} data, but data.modality is '{data.modality}' "
            f"(dataset '{data.name}'); use model.arch "
            f"{next(a for a, mod in ARCH_MODALITY.items() if mod == data.modality)!r}",
        )
        if self.arch == "vit":
            img = self.img_size if self.img_size is not None else data.image_size
            _check(
                img >= self.patch_size,
                "model.img_size",
                f"{img} is smaller than model.patch_size {self.patch_size}",
            )
            _check(
                img % self.patch_size == 0,
                "model.patch_size",
                f"{self.patch_size} does not divide the image size {img}",
            )
        _check(self.depth >= 1, "model.depth", "must be >= 1")
        _check(
            self.embed_dim % self.num_heads == 0,
            "model.num_heads",
            f"{self.num_heads} does not divide model.embed_dim {self.embed_dim}",
        )
        _check(self.mlp_ratio > 0, "model.mlp_ratio", "must be > 0")
        from fedvit.groups import KNOWN_GROUP_PATTERNS, is_known_group

        for group in self.frozen:
            _check(
                is_known_group(group, self.depth),
                "model.frozen",
                f"unknown parameter group '{group}'; known: {KNOWN_GROUP_PATTERNS}",
            )
        _check(
            0 <= self.drop_rate < 1 and 0 <= self.drop_path_rate < 1, "model.drop_rate", "must be in [0, 1)"
        )
        if self.pretrained and self.pretrained.startswith("timm:"):
            _check(
                self.arch == "vit",
                "model.pretrained",
                f"timm weights need model.arch 'vit', got '{self.arch}'",
            )
            _check_timm_name(self.pretrained[len("timm:") :])  # the one check that imports timm
        elif self.pretrained:
            _check(
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
            _check(
                is_known_group(group, model.depth),
                "method.private",
                f"unknown parameter group '{group}'; known: {KNOWN_GROUP_PATTERNS}",
            )
            needs = PLUGIN_OF_GROUP.get(group)
            _check(
                needs is None or bool(plugins & set(needs)),
                "method.private",
                f"group '{group}' needs {' or '.join(PLUGIN_SETTING[k] for k in needs or ())}, "
                f"got model.prefix.kind='{model.prefix.kind}', model.anytime.enabled={model.anytime.enabled}",
            )
        strategies, clients = names("strategy"), names("client")
        _check(self.strategy in strategies, "method.strategy", f"must be one of {strategies}")
        _check(self.client in clients, "method.client", f"must be one of {clients}")
        check_method_options(self)  # typed method.options: unknown keys, wrong types, bad values


@dataclass
class TrainConfig:
    """The client's local training."""

    local_epochs: int = 1
    local_steps: int | None = None  # if set, overrides local_epochs
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    amp: bool = True  # only on CUDA

    def validate(self) -> None:
        """``train``: positive lengths and sizes, a known optimizer with sane hyperparameters."""
        _check(self.local_epochs >= 1, "train.local_epochs", f"must be >= 1, got {self.local_epochs}")
        if self.local_steps is not None:
            _check(self.local_steps >= 1, "train.local_steps", f"must be >= 1, got {self.local_steps}")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
        _check(
            self.optimizer in OPTIMIZERS,
            "train.optimizer",
            f"must be one of {OPTIMIZERS}, got '{self.optimizer}'",
        )
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        if self.grad_clip is not None:
            _check(self.grad_clip > 0, "train.grad_clip", "must be > 0 (or null to disable)")


@dataclass
class ServerConfig:
    """Round structure, sampling, evaluation cadence, checkpoints."""

    num_rounds: int = 3
    fraction_train: float = 1.0
    min_train_clients: int = 1
    min_available_clients: int | None = None  # None: every client (clients.num_clients)
    eval_every: int = 1
    # Sampled evaluation: each evaluated round asks this share of the live clients (seeded by seed
    # and round, independent of the training sample); 1.0 (default) evaluates every client.
    eval_fraction: float = 1.0
    eval_min_clients: int = 1  # a sampled round asks at least this many clients
    # Rounds where every client is evaluated whatever eval_fraction is (also evaluated when not a
    # multiple of eval_every); the last round always is.
    eval_full_rounds: list[int] = field(default_factory=list)
    round_timeout: float = 3600.0
    checkpoint: bool = True
    resume: str | None = None  # a run directory (outputs/<run>) to continue

    def validate(self, num_clients: int) -> None:
        """``server`` for a federation of ``num_clients`` clients."""
        _check(self.num_rounds >= 1, "server.num_rounds", f"must be >= 1, got {self.num_rounds}")
        _check(
            0 < self.fraction_train <= 1,
            "server.fraction_train",
            f"must be in (0, 1], got {self.fraction_train}",
        )
        _check(self.min_train_clients >= 1, "server.min_train_clients", "must be >= 1")
        _check(
            self.min_train_clients <= num_clients,
            "server.min_train_clients",
            f"{self.min_train_clients} > clients.num_clients ({num_clients})",
        )
        if self.min_available_clients is not None:
            _check(
                1 <= self.min_available_clients <= num_clients,
                "server.min_available_clients",
                f"must be in [1, clients.num_clients={num_clients}], got {self.min_available_clients}",
            )
        _check(self.eval_every >= 1, "server.eval_every", f"must be >= 1, got {self.eval_every}")
        _check(
            0 < self.eval_fraction <= 1,
            "server.eval_fraction",
            f"must be in (0, 1], got {self.eval_fraction}",
        )
        _check(
            1 <= self.eval_min_clients <= num_clients,
            "server.eval_min_clients",
            f"must be in [1, clients.num_clients={num_clients}], got {self.eval_min_clients}",
        )
        _check(
            all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in self.eval_full_rounds),
            "server.eval_full_rounds",
            f"must be round numbers >= 1, got {list(self.eval_full_rounds)}",
        )
        _check(self.round_timeout > 0, "server.round_timeout", "must be > 0")


@dataclass
class ClientsConfig:
    """The federation's clients."""

    num_clients: int = 3
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # <state_dir>/client-<id>/<method>-<model>-<dataset>; default: in simulation
    # <run dir>/clients/client-<id>, for a device without node-config state-dir
    # ~/.cache/fedvit/state/<run-key>/client-<id>
    state_dir: str | None = None
    context_state_max_mb: float = 32.0  # private state above this goes to disk only

    def validate(self) -> None:
        """``clients``: at least one, on a device torch can name."""
        _check(self.num_clients >= 1, "clients.num_clients", f"must be >= 1, got {self.num_clients}")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "clients.device",
            f"must be auto, cpu, cuda or cuda:N, got '{self.device}'",
        )
        _check(self.context_state_max_mb >= 0, "clients.context_state_max_mb", "must be >= 0")


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = "outputs"
    run_name: str | None = None  # default: <method>-<dataset>-<timestamp>
    plots: bool = True
    tensorboard: bool = True  # TensorBoard event files in <run dir>/tb/ (fedvit.tensorboard)
    # clients send train/test label histograms (results.json "clients"; a device also needs its
    # node config label-histograms=true): simulation reporting, off by default (fedvit.boundary)
    label_histograms: bool = False


@dataclass
class PrivacyConfig:
    """Client-level differential privacy of the shared split (fedvit.privacy, docs/privacy.md)."""

    enabled: bool = False
    clip: float = 1.0  # L2 bound of each client's shared update
    noise_multiplier: float | None = None  # z: noise std z*clip/(clients per round) on the mean update
    target_epsilon: float | None = None  # instead of z: the z that reaches this epsilon after num_rounds
    delta: float = 1e-5  # must be < 1/clients.num_clients
    sampling: str = "poisson"  # accounting: poisson (rate = clients per round / clients) | none (rate 1)


@dataclass
class FedvitConfig:
    """The whole, validated configuration of one run."""

    seed: int = 0
    experiment: str | None = None
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    dp: PrivacyConfig = field(default_factory=PrivacyConfig)

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first impossible value, naming its key. Each section
        checks itself, given the sections it depends on; imports neither torch nor flwr (unless
        ``model.pretrained`` names timm weights, or ``dp`` asks the strategy whether it supports DP)."""
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        self.server.validate(self.clients.num_clients)
        self.clients.validate()
        self.train.validate()
        self.data.validate()
        self.model.validate(self.data)
        self.method.validate(self.model)
        if self.dp.enabled:
            from fedvit.privacy import check as check_privacy

            check_privacy(self)  # dp: its values, and whether the method's strategy accepts it


# Flower run-config key -> dotted key in FedvitConfig. The one list of these keys: pyproject.toml's
# [tool.flwr.app.config] (which Flower reads) must be flwr_app_config_toml(), checked by
# tests/test_config.py, which prints the section to paste when they differ.
RUN_CONFIG_KEYS: dict[str, str] = {
    "method": "method.name",
    "dataset": "data.name",
    "model": "model.name",
    "experiment": "experiment",
    "num-server-rounds": "server.num_rounds",
    "num-clients": "clients.num_clients",
    "fraction-train": "server.fraction_train",
    "local-epochs": "train.local_epochs",
    "partition": "data.partition.kind",
    "alpha": "data.partition.alpha",
    "data-dir": "data.data_dir",
    "seed": "seed",
    "output-dir": "output.dir",
    "run-name": "output.run_name",
    "eval-every": "server.eval_every",
    "resume": "server.resume",
}
OVERRIDES_KEY = "overrides"


def flwr_app_config_toml() -> str:
    """pyproject.toml's ``[tool.flwr.app.config]``: every run-config key, ``""`` (= not set: the
    YAML layers decide), in :data:`RUN_CONFIG_KEYS` order, then ``overrides``."""
    lines = [f'{key} = ""' for key in (*RUN_CONFIG_KEYS, OVERRIDES_KEY)]
    return "\n".join(["[tool.flwr.app.config]", *lines]) + "\n"

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


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path, what: str) -> DictConfig:
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"unknown {what} '{path.stem}' (no {path}); available: {available}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors
        raise ConfigError(f"cannot parse {path}: {err}") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} must hold a mapping")
    return cfg


def _select(layers: list[DictConfig | dict], key: str) -> Any:
    """The last non-empty value of dotted ``key`` across ``layers``."""
    value = None
    for layer in layers:
        node = OmegaConf.create(layer) if isinstance(layer, dict) else layer
        found = OmegaConf.select(node, key, default=None)
        if found not in (None, ""):
            value = found
    return value


def run_config_layer(run_config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Turn Flower run-config keys into a nested override dict and a dotlist.

    Unknown keys raise; ``""`` values are skipped (= not set).
    """
    nested: dict[str, Any] = {}
    dotlist: list[str] = []
    for key, value in run_config.items():
        if key == OVERRIDES_KEY:
            if not isinstance(value, str):
                raise ConfigError(f"run-config '{OVERRIDES_KEY}' must be a string, got {value!r}")
            dotlist = value.split()
            continue
        if key not in RUN_CONFIG_KEYS:
            raise ConfigError(
                f"unknown run-config key '{key}'; known keys: {sorted([*RUN_CONFIG_KEYS, OVERRIDES_KEY])}"
            )
        if value == "" or value is None:
            continue
        node = nested
        *parents, leaf = RUN_CONFIG_KEYS[key].split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested, dotlist


def _merge(layers: list[tuple[str, Any]]) -> DictConfig:
    cfg = OmegaConf.structured(FedvitConfig)
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{source}: {_describe(err)}") from err
    return cfg


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).split("\n")[0]
    return f"key '{key}': {msg}" if key else msg


def load_config(
    run_config: Mapping[str, Any] | None = None,
    conf_dir: Path | str | None = None,
) -> FedvitConfig:
    """Compose, type-check and validate the configuration of a run."""
    conf_dir = Path(conf_dir) if conf_dir is not None else CONF_DIR
    rc_nested, dotlist = run_config_layer(run_config or {})
    try:
        dot_layer = OmegaConf.from_dotlist(dotlist)
    except OmegaConfBaseException as err:
        raise ConfigError(f"run-config '{OVERRIDES_KEY}': {_describe(err)}") from err
    base = _read_yaml(conf_dir / "base.yaml", "base config")

    experiment = _select([base, rc_nested, dot_layer], "experiment")
    exp_layer = (
        _read_yaml(conf_dir / "experiment" / f"{experiment}.yaml", "experiment")
        if experiment
        else OmegaConf.create({})
    )
    chosen: dict[str, str] = {}
    layers: list[tuple[str, Any]] = [("conf/base.yaml", base)]
    for key, folder in (("method.name", "method"), ("data.name", "dataset"), ("model.name", "model")):
        name = _select([base, exp_layer, rc_nested, dot_layer], key)
        if not name:
            raise ConfigError(f"key '{key}': no {folder} selected")
        chosen[key] = str(name)
        path = conf_dir / folder / f"{name}.yaml"
        layers.append((f"conf/{folder}/{name}.yaml", _read_yaml(path, folder)))
    if experiment:
        layers.append((f"conf/experiment/{experiment}.yaml", exp_layer))
    layers.append(("run config", rc_nested))
    layers.append((f"run-config '{OVERRIDES_KEY}'", dot_layer))
    layers.append(("selectors", OmegaConf.from_dotlist([f"{k}={v}" for k, v in chosen.items()])))
    merged = _merge(layers)
    try:
        cfg: FedvitConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from err
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- validation


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"key '{key}': {msg}")


def _check_timm_name(name: str) -> None:
    """``model.pretrained='timm:<name>'`` names a timm model with pretrained weights (no download)."""
    import timm

    try:
        known = timm.is_model(name) and timm.models.get_pretrained_cfg(name) is not None
    except RuntimeError:  # a tag the architecture does not have
        known = False
    _check(
        known,
        "model.pretrained",
        f"'timm:{name}': timm has no model '{name}' with pretrained weights "
        "(list them with timm.list_pretrained('vit_*'))",
    )


def validate(cfg: FedvitConfig) -> None:
    """Raise :class:`ConfigError` on the first impossible value (:meth:`FedvitConfig.validate`)."""
    cfg.validate()


# --------------------------------------------------------------------------- helpers


def to_dict(cfg: FedvitConfig) -> dict[str, Any]:
    """Plain, JSON-serializable dict of a config."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: FedvitConfig) -> str:
    """YAML text of a config (what ``outputs/<run>/config.yaml`` holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-serializable object."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_img_size(cfg: FedvitConfig) -> int:
    """The side length images are resized to for the model."""
    return cfg.model.img_size if cfg.model.img_size is not None else cfg.data.image_size
