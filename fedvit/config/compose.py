"""Composing a run's configuration (:func:`load_config`): the YAML layers of ``conf/``
(:data:`CONF_DIR`), the Flower run config (:data:`RUN_CONFIG_KEYS`) and its ``overrides``, merged
onto the schema and validated; and what is done with a config (dict, YAML, fingerprint)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedvit.config.schema import FedvitConfig
from fedvit.errors import ConfigError


def _find_conf_dir() -> Path:
    """``conf/`` beside the package (source tree, FAB) or inside it (wheel install: ``fedvit/conf``)."""
    package = Path(__file__).resolve().parent.parent  # fedvit/
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "base.yaml").is_file():
            return candidate
    return package.parent / "conf"


CONF_DIR = _find_conf_dir()


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


def model_input_shape(cfg: FedvitConfig) -> tuple[int, ...]:
    """One model input's shape: ``(seq_len,)`` character indices or ``(in_chans, side, side)``."""
    if cfg.model.arch == "char-transformer":
        return (cfg.data.seq_len,)
    size = model_img_size(cfg)
    return (cfg.data.in_chans, size, size)
