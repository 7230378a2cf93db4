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

The package: :mod:`~fedvit.config.checks` (the values keys may take, the one check),
:mod:`~fedvit.config.sections` (``data``, ``model``, ``method``), :mod:`~fedvit.config.schema`
(``train``, ``server``, ``clients``, ``output``, ``dp`` and :class:`FedvitConfig`),
:mod:`~fedvit.config.compose` (:func:`load_config`, the run-config keys, helpers). Import every
name from ``fedvit.config``.
"""

from __future__ import annotations

from fedvit.config.checks import (
    ARCH_MODALITY,
    DATA_SOURCES,
    MODALITIES,
    OPTIMIZERS,
    PARTITION_KINDS,
    PLUGIN_OF_GROUP,
    PLUGIN_SETTING,
    PREFIX_KINDS,
    TEXT_SOURCES,
)
from fedvit.config.compose import (
    CONF_DIR,
    OVERRIDES_KEY,
    RUN_CONFIG_KEYS,
    fingerprint,
    flwr_app_config_toml,
    load_config,
    model_img_size,
    model_input_shape,
    run_config_layer,
    to_dict,
    to_yaml,
    validate,
)
from fedvit.config.schema import (
    ClientsConfig,
    FedvitConfig,
    OutputConfig,
    PrivacyConfig,
    ServerConfig,
    TrainConfig,
)
from fedvit.config.sections import (
    AnytimeConfig,
    DataConfig,
    MethodConfig,
    ModelConfig,
    PartitionConfig,
    PrefixConfig,
)
from fedvit.errors import ConfigError  # users import it from here; defined import-free for low modules

__all__ = [
    "ARCH_MODALITY",
    "CONF_DIR",
    "DATA_SOURCES",
    "MODALITIES",
    "OPTIMIZERS",
    "OVERRIDES_KEY",
    "PARTITION_KINDS",
    "PLUGIN_OF_GROUP",
    "PLUGIN_SETTING",
    "PREFIX_KINDS",
    "RUN_CONFIG_KEYS",
    "TEXT_SOURCES",
    "AnytimeConfig",
    "ClientsConfig",
    "ConfigError",
    "DataConfig",
    "FedvitConfig",
    "MethodConfig",
    "ModelConfig",
    "OutputConfig",
    "PartitionConfig",
    "PrefixConfig",
    "PrivacyConfig",
    "ServerConfig",
    "TrainConfig",
    "fingerprint",
    "flwr_app_config_toml",
    "load_config",
    "model_img_size",
    "model_input_shape",
    "run_config_layer",
    "to_dict",
    "to_yaml",
    "validate",
]
