"""``fedvit pretrain``: train a plain ViT centrally on one dataset and save its state dict.

The file is what ``model.pretrained`` loads (:func:`fedvit.models.load_pretrained`, which keeps
the fresh init for shape-mismatched keys such as a head for another number of classes), e.g. a
backbone pre-trained on CIFAR-10 served as 1-channel 28 px images
(``data.in_chans=1 data.image_size=28``: luminance, resized) for federated adapters on FEMNIST.
The whole train split of ``data`` is used (or a seeded subset of ``max_examples``); accuracy is
measured on its test split (or the seeded hold-out). Plugins are off: the file holds backbone
keys only.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedvit.config import FedvitConfig, to_dict


def plain_config(cfg: FedvitConfig) -> FedvitConfig:
    """``cfg`` with plugins off and no pretrained file: the backbone alone."""
    model = dataclasses.replace(
        cfg.model,
        pretrained=None,
        prefix=dataclasses.replace(cfg.model.prefix, kind="none"),
        anytime=dataclasses.replace(cfg.model.anytime, enabled=False),
    )
    return dataclasses.replace(cfg, model=model)


def pretrain(
    cfg: FedvitConfig,
    out: Path | str,
    *,
    epochs: int = 1,
    max_examples: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``cfg``'s plain ViT on ``cfg.data``'s train split; write ``{"model": state_dict}``
    to ``out`` atomically; return a summary (examples, test accuracy, seconds, path).
    ``progress`` receives one line per epoch (and one before the first)."""
    from fedvit.data import ImageDataset, make_transform, prepared_source
    from fedvit.models import build_model
    from fedvit.training import evaluate, make_loader, resolve_device, train_local

    if cfg.data.modality != "image":
        raise ValueError("pretrain: image datasets only")
    if epochs < 1:
        raise ValueError(f"pretrain: epochs must be >= 1, got {epochs}")
    cfg = plain_config(cfg)
    t0 = time.time()
    source = prepared_source(cfg)
    assert source.test is not None
    idx = np.arange(len(source.train))
    if max_examples is not None and max_examples < len(idx):
        idx = np.sort(np.random.default_rng(cfg.seed).choice(idx, max_examples, replace=False))
    transform = make_transform(cfg)
    train = ImageDataset(source.train, idx, transform)
    test = ImageDataset(source.test, np.arange(len(source.test)), transform)
    device = resolve_device(cfg.clients.device)
    model = build_model(cfg)
    tc = dataclasses.replace(cfg.train, local_steps=None, local_epochs=epochs)
    loader = make_loader(train, tc.batch_size, shuffle=True, seed=cfg.seed, workers=cfg.data.num_workers)
    say = progress or (lambda _line: None)
    say(f"pretrain: {len(train)} examples, {epochs} epoch(s) of {len(loader)} batches on {device}")

    def on_epoch(epoch: int, running: Any) -> None:
        say(
            f"pretrain: epoch {epoch}/{epochs}: running train loss {running.loss:.4f}, "
            f"acc {running.accuracy:.4f} ({time.time() - t0:.0f}s)"
        )

    result = train_local(model, loader, tc, device, on_epoch=on_epoch)
    test_loader = make_loader(test, tc.eval_batch_size, shuffle=False, workers=cfg.data.num_workers)
    acc = evaluate(model, test_loader, device).accuracy
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"model": state}, tmp)
    os.replace(tmp, out)
    return {
        "path": str(out),
        "dataset": cfg.data.name,
        "examples": len(train),
        "epochs": epochs,
        "train_loss": result.loss,
        "train_acc": result.accuracy,
        "test_acc": acc,
        "seconds": round(time.time() - t0, 1),
        "model": to_dict(cfg)["model"],
    }
