"""Checks of a run's data, partition and model that need no SuperLink, no Ray and no client.

:func:`check` runs the project's own loading and partitioning code once, in the calling
process, and turns every problem into one :class:`~fedvit.config.ConfigError` on one line that
names the config key (and its run-config alias, e.g. ``'clients.num_clients' (run-config
'num-clients')``):

1. **data**: the file or folder exists (``data.path`` under ``data.data_dir``) and loads with the
   real loader; a corrupt or unreadable file becomes an error naming ``data.path``. Sources that
   would come from the Hugging Face hub (``data.source: hub`` without a local path, or a missing
   local copy with ``data.hub_id``) are not downloaded here: the clients fetch them.
2. **classes**: the labels lie in ``[0, data.num_classes)`` (the model's head has
   ``data.num_classes`` outputs), and a source that names its classes names exactly that many.
3. **samples**: the first and last sample of each split, put through the configured transform,
   have the shape the model takes (``example_input``): channels (``data.in_chans``) and side
   (``model.img_size``, else ``data.image_size``); text tokens lie in the vocabulary.
4. **partition**: :func:`fedvit.data.build_partition` for ``clients.num_clients`` clients (iid,
   Dirichlet with ``data.partition.min_size``: flwr-datasets re-draws at most 10 times, then
   gives up; pathological; natural ids; by the pooled protocol, ``data.partition.pool``, over the
   pooled official splits, whose val split's samples are checked too). It writes the on-disk
   partition cache, so the clients of the run read the indices instead of computing them again.
5. **pretrained weights** (``model.pretrained``): every tensor of the file exists in the model
   and, except the classification head, has the model's shape (a patch embedding for other
   channels or patches, or position embeddings for another image size, are errors). For
   ``timm:<name>`` the weights load through timm (resampled to the model's patch and grid): not
   in the local Hugging Face cache while offline, or no tensor fitting, is the error.

:func:`check_server` is the ServerApp's entry: it checks only when the data is local to the
ServerApp (see :func:`data_is_local`).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np

from fedvit.config import RUN_CONFIG_KEYS, ConfigError, FedvitConfig, model_input_shape

#: Parameter names whose shape may differ from a pretrained file's (a new classification head).
HEAD_KEYS = ("head.", "exit_head.")

_ALIASES = {dotted: key for key, dotted in RUN_CONFIG_KEYS.items()}


def check(cfg: FedvitConfig, *, cwd: str | Path | None = None, release: bool = False) -> None:
    """Raise :class:`ConfigError` (one line, naming the key) unless ``cfg`` can run here.

    ``cwd``: the directory a relative ``data.data_dir`` / ``data.cache_dir`` is relative to (the
    caller's working directory for ``fedvit run``). ``release``: forget the loaded data and
    partitions afterwards (a process that only submits the run need not hold them).
    """
    try:
        _check(_anchored(cfg, cwd))
    except ConfigError as err:
        raise type(err)(_one_line(str(err))) from err
    finally:
        if release:
            from fedvit.data import clear_all_caches

            clear_all_caches()


def data_is_local(grid: Any) -> bool:
    """Whether the ServerApp sees the files its clients read.

    True for Flower's simulation engine (its ``InMemoryGrid``: the ClientApps run on the machine
    that runs the ServerApp) and for fedvit's :class:`~fedvit.inprocess.InProcessGrid` unless a
    node brings its own data (node-config ``data-path``). False for a deployment's grid: there the
    data lives on the devices, and each SuperNode's ClientApp reports its own data errors when the
    server asks it to identify itself.
    """
    from flwr.superlink.grid import InMemoryGrid

    from fedvit.inprocess import InProcessGrid

    if isinstance(grid, InMemoryGrid):
        return True
    if isinstance(grid, InProcessGrid):
        return not any("data-path" in ctx.node_config for ctx in grid.contexts.values())
    return False


def check_server(grid: Any, cfg: FedvitConfig) -> None:
    """The ServerApp's check: :func:`check` when :func:`data_is_local`, else nothing."""
    if data_is_local(grid):
        check(cfg)


# --------------------------------------------------------------------------- the checks


def _check(cfg: FedvitConfig) -> None:
    from fedvit.data import build_partition
    from fedvit.data.sources import source_identity

    ident = source_identity(cfg.data)  # raises for a missing local file (unless data.hub_id is set)
    if ident["source"] == "hub" and ident["path"] is None:  # downloaded by the clients, not here
        _check_pretrained(cfg)
        return
    source = _load(cfg)
    _check_class_names(cfg, source)
    pooled_val = source.val if cfg.data.partition.pool else None  # only the pooled protocol reads it
    for name, split in (("train", source.train), ("test", source.test), ("val", pooled_val)):
        if split is not None and len(split):
            _check_samples(cfg, name, split)
    build_partition(cfg)
    _check_pretrained(cfg)


def _load(cfg: FedvitConfig) -> Any:
    """The source with its test split, through the real loader; any failure names ``data.path``."""
    from fedvit.data import DataError, prepared_source

    try:
        return prepared_source(cfg)
    except DataError:
        raise
    except Exception as err:  # corrupt files: zip CRC errors, bad parquet footers, ...
        raise ConfigError(
            f"key 'data.path': cannot load '{cfg.data.path}' (data.source '{cfg.data.source}', "
            f"data.data_dir '{cfg.data.data_dir}'): {type(err).__name__}: {err}"
        ) from err


def _check_class_names(cfg: FedvitConfig, source: Any) -> None:
    names = source.class_names
    if names is not None and len(names) != cfg.data.num_classes:
        raise ConfigError(
            f"key 'data.num_classes': '{cfg.data.name}' names {len(names)} classes ({', '.join(names[:3])}, "
            f"...), but data.num_classes (the model's outputs) is {cfg.data.num_classes}"
        )


def _check_samples(cfg: FedvitConfig, name: str, split: Any) -> None:
    """The first and last samples of ``split`` through the transform, against the model's input."""
    from fedvit.data import dataset_factory

    want = model_input_shape(cfg)  # not through fedvit.models: importing timm costs seconds here
    dataset = dataset_factory(cfg)(split, np.array([0, len(split) - 1]))
    for i in range(len(dataset)):
        try:
            x, _ = dataset[i]
        except ConfigError:
            raise
        except Exception as err:  # undecodable image bytes, ragged arrays, ...
            raise ConfigError(
                f"key 'data.path': sample {dataset.indices[i]} of the {name} split of '{cfg.data.name}' "
                f"cannot be read: {type(err).__name__}: {err}"
            ) from err
        if cfg.data.modality == "text":
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= cfg.data.num_classes):
                raise ConfigError(
                    f"key 'data.num_classes': the {name} split has token ids {int(x.min())}..{int(x.max())}, "
                    f"outside the vocabulary of data.num_classes={cfg.data.num_classes}"
                )
            continue
        if tuple(x.shape) != want:
            raise ConfigError(
                f"key 'data.in_chans' / 'model.img_size': a {name} image of '{cfg.data.name}' "
                f"{tuple(split.images[int(dataset.indices[i])].shape)} (H, W, C) becomes {tuple(x.shape)} "
                f"after the transform, but the model takes {want} (data.in_chans, side, side)"
            )
        if not bool(np.isfinite(x.numpy()).all()):
            raise ConfigError(
                f"key 'data.std': a {name} image of '{cfg.data.name}' is not finite after normalization"
            )


def _check_pretrained(cfg: FedvitConfig) -> None:
    """``model.pretrained``: known keys, and the model's shapes except the head's."""
    if not cfg.model.pretrained:
        return
    import torch

    from fedvit.models import build_model

    if cfg.model.pretrained.startswith("timm:"):
        # Loads through timm (the local HF cache when offline): weights that are not there, or of
        # which no tensor fits, are a ConfigError; resampled patch / position embeddings are meant.
        build_model(cfg)
        return
    path = Path(cfg.model.pretrained).expanduser()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"key 'model.pretrained': cannot load {path}: {type(err).__name__}: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ConfigError(f"key 'model.pretrained': {path} holds no state dict")
    bare = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None))
    own = build_model(bare).state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ConfigError(f"key 'model.pretrained': {path} has tensors this model lacks: {unknown[:5]}")
    for key, value in state.items():
        shape, mine = tuple(value.shape), tuple(own[key].shape)
        if shape == mine or key.startswith(HEAD_KEYS):
            continue
        raise ConfigError(
            f"key {_keys_of(key)}: model.pretrained {path} has {key} of shape {shape}, this model "
            f"{mine} (model.img_size / model.patch_size / data.in_chans / model.embed_dim as when it was "
            "trained?)"
        )


def _keys_of(param: str) -> str:
    """The config keys that most likely decide the shape of parameter ``param``."""
    if param.startswith("patch_embed"):
        return "'data.in_chans' / 'model.patch_size'"
    if param == "pos_embed":
        return "'model.img_size' / 'model.patch_size'"
    return "'model.embed_dim'"


# --------------------------------------------------------------------------- helpers


def _anchored(cfg: FedvitConfig, cwd: str | Path | None) -> FedvitConfig:
    """``cfg`` with a relative ``data.data_dir`` / ``data.cache_dir`` made absolute against ``cwd``."""
    if cwd is None:
        return cfg
    d = cfg.data
    data_dir = Path(d.data_dir).expanduser()
    changes: dict[str, Any] = {}
    if not data_dir.is_absolute():
        changes["data_dir"] = str((Path(cwd) / data_dir).resolve())
    if d.cache_dir and not Path(d.cache_dir).expanduser().is_absolute():
        changes["cache_dir"] = str((Path(cwd) / d.cache_dir).resolve())
    return dataclasses.replace(cfg, data=dataclasses.replace(d, **changes)) if changes else cfg


def _one_line(msg: str) -> str:
    """``msg`` on one line, with the run-config alias of each config key it names."""
    text = " ".join(msg.split())
    named = re.findall(r"'([a-z_]+(?:\.[a-z_]+)+)'", text)
    aliases = [
        f"'{_ALIASES[k]}'" for k in dict.fromkeys(named) if k in _ALIASES and f"'{_ALIASES[k]}'" not in text
    ]
    return f"{text} (run-config {', '.join(aliases)})" if aliases else text
