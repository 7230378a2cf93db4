"""``fedvit export``: one client's personalized model as a self-contained file for local inference.

The personalized model of client *i* is what it is evaluated with: the shared parameters of the
run's last checkpoint (``<run dir>/checkpoint/arrays.npz``) combined with the client's own private
parameters (``private.npz`` in its state directory). The export is a ``torch.export`` program
(``.pt2``, loadable with ``torch.export.load`` alone: no fedvit, timm or Flower needed; any batch
size) that carries, as the extra file ``fedvit.json``, the model config, the input preprocessing
(size, channels, mean, std, invert), the class names and where the weights came from.
``scripts/predict.py`` is a plain example.

Methods whose personalized model is not "shared + private parameters" (an evaluation-time
adaptation such as FedBABU's or Per-FedAvg's fine-tuning, APFL's mixture, FedTP's and pFedLA's
server-generated per-client parameters) are refused with the reason. A method says how its model
is exported in one place on each side: its client class's :class:`ExportPolicy` (``export``
attribute: may it be exported, which private keys its state directory holds, where to cut the
model) and its strategy's ``exportable`` flag (``False``: the server makes per-client parameters
the checkpoint does not hold).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from omegaconf import OmegaConf

from fedvit import io
from fedvit.config import ConfigError, FedvitConfig, load_config, model_img_size, to_dict, validate
from fedvit.state import PrivateStore, StateError, store_fingerprint

#: Extra file inside the exported archive with everything a script needs besides the weights.
META_FILE = "fedvit.json"
FORMAT = "fedvit-export/1"


@dataclass
class Personalized:
    """One client's personalized model and what it was made from."""

    cfg: FedvitConfig
    model: torch.nn.Module
    client_id: int | None
    round: int | None
    state_dir: Path
    checkpoint: Path
    cut: dict[str, Any] = field(default_factory=dict)  # where the model was cut (early exits)


def config_from_yaml(path: str | Path) -> FedvitConfig:
    """A run's resolved config from its ``config.yaml`` (as the ServerApp wrote it)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(FedvitConfig), OmegaConf.load(Path(path)))
        cfg: FedvitConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except (OSError, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot read the run config {path}: {err}") from err
    validate(cfg)
    return cfg


class ExportPolicy:
    """How a client class's personalized model becomes an export. A client class declares one as
    its ``export`` class attribute (the base client: this default; anytime: its own, which cuts the
    model at an exit); it holds for the class that declares it and its subclasses."""

    #: Overrides that make the personalized model more than shared + private parameters.
    EVAL_HOOKS: ClassVar[tuple[str, ...]] = (
        "personalize_for_eval",
        "private_state",
        "restore_private_state",
        "evaluate",
    )

    def check(self, client_cls: type, cfg: FedvitConfig) -> None:
        """:class:`ConfigError` unless ``client_cls``'s personalized model is the model with the
        checkpoint's shared and its stored private parameters. Default: refused when the class
        overrides an evaluation hook of the class that declared this policy."""
        owner = next((k for k in client_cls.__mro__ if vars(k).get("export") is self), client_cls)
        hooks = [h for h in self.EVAL_HOOKS if getattr(client_cls, h) is not getattr(owner, h)]
        if hooks:
            raise ConfigError(
                f"method '{cfg.method.name}': its client ({client_cls.__name__}) overrides "
                f"{', '.join(hooks)}, so its personalized model is not the shared + private parameters; "
                "export is not supported"
            )

    def stored_private_keys(self, model: torch.nn.Module, split: Any) -> list[str]:
        """The private parameters the state directory holds (the rest the model rebuilds itself)."""
        return list(split.private)

    def cut(self, model: torch.nn.Module, cfg: FedvitConfig, exit: int | None, tier: int | None) -> dict:
        """Prepare ``model`` to be exported at exit ``exit`` (``None``: the model's own output);
        what to add to the export's metadata. Only early-exit models have exits to choose."""
        if exit is not None:
            raise ConfigError(f"method '{cfg.method.name}' has no early exits: drop --exit")
        return {}


def check_exportable(cfg: FedvitConfig) -> None:
    """:class:`ConfigError` unless the method's personalized model is shared + private parameters
    (its client's :class:`ExportPolicy`, its strategy's ``exportable``)."""
    from fedvit.registry import get_client, get_strategy

    client, strategy = get_client(cfg.method.client), get_strategy(cfg.method.strategy)
    client.export.check(client, cfg)
    if not strategy.exportable:
        raise ConfigError(
            f"method '{cfg.method.name}': the server sends each client its own parameters "
            f"({strategy.__name__}), which the checkpoint does not hold; export is not supported"
        )


def personalized_model(
    state_dir: str | Path,
    cfg: FedvitConfig,
    checkpoint: str | Path,
    client_id: int | None = None,
    *,
    exit: int | None = None,
    tier: int | None = None,
) -> Personalized:
    """Build ``cfg``'s model with the checkpoint's shared and the state directory's private
    parameters, cut at early exit ``exit`` (``None``: the deepest the client runs, ``tier``)."""
    from fedvit.models import build_model
    from fedvit.params import ParameterSplit, check_arrays, set_arrays
    from fedvit.registry import get_client

    check_exportable(cfg)
    policy: ExportPolicy = get_client(cfg.method.client).export
    ckpt = Path(checkpoint).expanduser()
    if not (ckpt / "arrays.npz").is_file():
        raise ConfigError(f"no checkpoint in {ckpt} (missing arrays.npz); was the run checkpointed?")
    model = build_model(cfg)
    split = ParameterSplit.from_model(model, cfg.method.private)
    with np.load(ckpt / "arrays.npz", allow_pickle=False) as z:
        shared = {k: z[k] for k in z.files}
    check_arrays(shared, split.shapes(model, "shared"), who=f"checkpoint {ckpt}")
    stored = split.shapes(model, "private")
    try:
        store = PrivateStore.locate(state_dir, cfg, store_fingerprint(cfg, stored))
        private = store.read()
    except StateError as err:
        raise ConfigError(str(err)) from err
    stored = {k: stored[k] for k in policy.stored_private_keys(model, split)}
    check_arrays(private, stored, who=f"state directory {store.state_dir}")
    set_arrays(model, {**shared, **private})
    cut = policy.cut(model, cfg, exit, tier)
    state = ckpt / "state.json"
    rnd = json.loads(state.read_text()).get("round") if state.is_file() else None
    return Personalized(cfg, model.eval(), client_id, rnd, store.state_dir, ckpt, cut)


def reported_tier(run_dir: Path, client_id: int | None) -> int | None:
    """The tier client ``client_id`` reported in the run's last evaluation (``results.json``)."""
    path = run_dir / "results.json"
    if client_id is None or not path.is_file():
        return None
    for rnd in reversed(json.loads(path.read_text()).get("rounds", [])):
        tier = rnd.get("eval", {}).get("per_client", {}).get(str(client_id), {}).get("tier")
        if tier is not None:
            return int(tier)
    return None


def preprocessing(cfg: FedvitConfig) -> dict[str, Any]:
    """How raw inputs become model inputs (mirrors :class:`fedvit.data.datasets.ImageTransform`)."""
    if cfg.data.modality == "text":
        return {"modality": "text", "seq_len": cfg.data.seq_len, "vocab_size": cfg.data.num_classes}
    d = cfg.data
    return {
        "modality": "image",
        "size": model_img_size(cfg),
        "in_chans": d.in_chans,
        "mean": list(d.mean),
        "std": list(d.std),
        "invert": bool(d.invert),
        "input": "uint8 images (H, W) or (H, W, C), scaled to [0, 1], inverted if 'invert', "
        "channels matched (gray->RGB repeat, RGB->gray luminance), bilinear resize "
        "(antialiased when shrinking), then (x - mean) / std",
    }


def export(
    state_dir: str | Path,
    out: str | Path,
    *,
    run_dir: str | Path | None = None,
    run_config: dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    client_id: int | None = None,
    class_names: list[str] | None = None,
    exit: int | None = None,
) -> Path:
    """Write client ``state_dir``'s personalized model to ``out`` (a ``torch.export`` program with
    ``fedvit.json`` inside).

    The run's config comes from ``run_dir/config.yaml`` or, without ``run_dir``, from
    ``run_config`` (Flower run-config keys, as for ``fedvit run``); the shared parameters from
    ``checkpoint`` (default ``run_dir/checkpoint``). Early-exit models (anytime) are cut at
    ``exit`` (default: the client's tier, as ``run_dir/results.json`` reports it for
    ``client_id``); nothing after that exit is in the program.
    """
    from fedvit.models import example_input

    tier = None
    owner = Path(state_dir).expanduser().resolve().parent.parent  # <run dir>/clients/client-<id>
    if run_dir is None and run_config is None and (owner / "config.yaml").is_file():
        run_dir = owner  # a simulated client's state lives in its run directory
    if run_dir is not None:
        rd = Path(run_dir).expanduser()
        cfg = config_from_yaml(rd / "config.yaml")
        checkpoint = checkpoint or rd / "checkpoint"
        tier = reported_tier(rd, client_id)
    elif run_config is not None:
        cfg = load_config(run_config)
        if checkpoint is None:
            raise ConfigError("export: give --checkpoint (or --run-dir) with --run-config")
    else:
        raise ConfigError(
            "export: give --run-dir, or --run-config with --checkpoint "
            "(a state directory inside a run directory, <run dir>/clients/client-<id>, needs neither)"
        )
    p = personalized_model(state_dir, cfg, checkpoint, client_id, exit=exit, tier=tier)
    x = example_input(cfg, batch=2)
    if x.is_floating_point():
        x = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        program = torch.export.export(p.model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        for batch in (1, 3):  # the exported program reproduces the model, at any batch size
            xb = torch.cat([x] * 2)[:batch]
            if not torch.allclose(p.model(xb), program.module()(xb), rtol=1e-4, atol=1e-5):
                raise RuntimeError("the exported program does not reproduce the model; export aborted")
    meta = {
        "format": FORMAT,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "client_id": client_id,
        "round": p.round,
        **p.cut,
        "num_classes": cfg.data.num_classes,
        "class_names": class_names,
        "preprocess": preprocessing(cfg),
        "source": {"state_dir": str(p.state_dir.resolve()), "checkpoint": str(p.checkpoint.resolve())},
        "config": to_dict(cfg),
    }
    extra_files = {META_FILE: json.dumps(meta, indent=1)}
    return io.atomic_write(
        Path(out).expanduser(), lambda f: torch.export.save(program, f, extra_files=extra_files)
    )


def load_export(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, metadata) of an exported file (what ``scripts/predict.py`` does, with torch alone)."""
    extra = {META_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program.module(), json.loads(extra[META_FILE])
