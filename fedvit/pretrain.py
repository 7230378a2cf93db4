"""``fedvit pretrain``: train a plain ViT centrally on one dataset and save its state dict.

The file is what ``model.pretrained`` loads (:func:`fedvit.models.load_pretrained`, which keeps
the fresh init for shape-mismatched keys such as a head for another number of classes), e.g. a
backbone pre-trained on CIFAR-10 at RGB 32 px (``dataset='cifar10'``: 3 channels, 32 px, no resize)
or served as 1-channel 28 px images (``data.in_chans=1 data.image_size=28``: luminance, resized).
The whole train split of ``data`` is used (or a seeded subset of ``max_examples``); accuracy is
measured on its test split (or the seeded hold-out). Plugins are off: the file holds backbone
keys only.

What a real pretraining needs (:class:`PretrainOptions`): augmentation of each training batch
(random crop after zero padding in normalized space, i.e. padding with the data mean, and random
horizontal flips; ``auto`` flips RGB images only, since a flipped character or a flipped
left/right organ changes its class), a per-step learning-rate schedule (linear warm-up from 0, then
cosine decay to ``min_lr``), optional label smoothing, and a resumable checkpoint
(``<out>.resume``, written atomically every ``checkpoint_every`` steps and after every epoch;
deleted when the weights are written). Batches, augmentation and dropout are seeded by
(``seed``, step), so a resumed pretraining takes exactly the steps of an uninterrupted one.
Next to the weights, ``<out stem>.json`` records the settings, epochs, seconds and the test
accuracy.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedvit import io
from fedvit.config import ConfigError, FedvitConfig, to_dict

AUGMENTS = ("auto", "none", "crop", "crop-flip", "flip")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class PretrainOptions:
    """How ``fedvit pretrain`` trains (the optimizer, lr, batch size and grad clip come from ``train``)."""

    epochs: int = 1
    max_examples: int | None = None  # a seeded subset of the train split
    augment: str = "auto"  # auto (crop-flip for RGB, crop otherwise) | none | crop | crop-flip | flip
    crop_padding: int = 4  # pixels of padding before the random crop (at the model's image size)
    schedule: str = "cosine"  # cosine (after the warm-up) | constant
    warmup_epochs: float = 0.0  # linear warm-up from 0, in epochs ...
    warmup_steps: int | None = None  # ... or in optimizer steps (overrides warmup_epochs)
    min_lr: float = 0.0  # the cosine schedule's final lr
    label_smoothing: float = 0.0
    checkpoint_every: int = 0  # also checkpoint every N steps (0: after each epoch only)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option."""
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.max_examples is None or self.max_examples >= 1, "max_examples must be >= 1"),
            (self.augment in AUGMENTS, f"augment must be one of {AUGMENTS}, got '{self.augment}'"),
            (self.crop_padding >= 0, f"crop_padding must be >= 0, got {self.crop_padding}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got '{self.schedule}'"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.min_lr >= 0, f"min_lr must be >= 0, got {self.min_lr}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"pretrain: {msg}")


def plain_config(cfg: FedvitConfig) -> FedvitConfig:
    """``cfg`` with plugins off and no pretrained file: the backbone alone."""
    model = dataclasses.replace(
        cfg.model,
        pretrained=None,
        prefix=dataclasses.replace(cfg.model.prefix, kind="none"),
        anytime=dataclasses.replace(cfg.model.anytime, enabled=False),
    )
    return dataclasses.replace(cfg, model=model)


def resolve_augment(augment: str, source_chans: int) -> tuple[bool, bool]:
    """``(crop, flip)`` of ``augment``; ``auto`` flips only RGB (natural) images."""
    if augment == "auto":
        return True, source_chans == 3
    return "crop" in augment, "flip" in augment


def augment_batch(x: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of ``x`` (B, C, H, W) zero-padded by ``padding`` on each side, then a
    horizontal flip of a random half (each sample with probability 1/2)."""
    b, c, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
        x = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        mask = torch.rand(b, generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """The lr multiplier at optimizer step ``step`` (0-based) of ``total``: linear warm-up over
    ``warmup`` steps (reaching 1 at step ``warmup``), then cosine decay to ``min_ratio`` at the last step
    (or constant)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant" or total - warmup <= 1:
        return 1.0
    progress = (step - warmup) / (total - warmup - 1)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resume_path(out: Path) -> Path:
    """The resumable checkpoint of a pretraining that writes ``out``."""
    return out.with_name(out.name + ".resume")


def summary_path(out: Path) -> Path:
    """The JSON written next to the weights ``out``."""
    return out.with_suffix(".json")


def _settings(cfg: FedvitConfig, opts: PretrainOptions) -> dict[str, Any]:
    """What a resumed pretraining must share with the one that wrote the checkpoint."""
    d = to_dict(cfg)
    return {
        "options": dataclasses.asdict(opts),
        "model": d["model"],
        "data": {
            k: d["data"][k] for k in ("name", "source", "path", "in_chans", "image_size", "mean", "std")
        },
        "train": d["train"],
        "seed": cfg.seed,
    }


def pretrain(
    cfg: FedvitConfig,
    out: Path | str,
    *,
    epochs: int | None = None,
    max_examples: int | None = None,
    options: PretrainOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``cfg``'s plain ViT on ``cfg.data``'s train split; write ``{"model": state_dict}`` to
    ``out`` and the summary to ``<out stem>.json`` (both atomically); return the summary.

    ``epochs`` / ``max_examples`` override those of ``options``. A ``<out>.resume`` checkpoint of
    the same settings is continued; one of other settings is refused. ``progress`` receives one
    line per epoch and per checkpoint (and one before the first), each after the checkpoint it
    reports is on disk.
    """
    from fedvit.data import ImageDataset, make_transform, prepared_source
    from fedvit.models import build_model
    from fedvit.training import Stepper, Tally, evaluate, loss_forward, make_loader, resolve_device

    opts = options or PretrainOptions()
    if epochs is not None:
        opts = dataclasses.replace(opts, epochs=epochs)
    if max_examples is not None:
        opts = dataclasses.replace(opts, max_examples=max_examples)
    opts.validate()
    if cfg.data.modality != "image":
        raise ValueError("pretrain: image datasets only")
    cfg = plain_config(cfg)
    t0 = time.time()
    source = prepared_source(cfg)
    assert source.test is not None
    idx = np.arange(len(source.train))
    if opts.max_examples is not None and opts.max_examples < len(idx):
        idx = np.sort(np.random.default_rng(cfg.seed).choice(idx, opts.max_examples, replace=False))
    transform = make_transform(cfg)
    train = ImageDataset(source.train, idx, transform)
    test = ImageDataset(source.test, np.arange(len(source.test)), transform)
    crop, flip = resolve_augment(opts.augment, int(source.train.images[0].shape[-1]))
    padding = opts.crop_padding if crop else 0
    device = resolve_device(cfg.clients.device)
    model = build_model(cfg).to(device)
    tc = cfg.train
    bs = tc.batch_size
    per_epoch = math.ceil(len(train) / bs)
    total = opts.epochs * per_epoch
    warmup = opts.warmup_steps if opts.warmup_steps is not None else round(opts.warmup_epochs * per_epoch)
    warmup = min(warmup, total)
    stepper = Stepper(
        model,
        model.parameters(),
        tc,
        device,
        loss_forward(nn.CrossEntropyLoss(label_smoothing=opts.label_smoothing)),
        nonfinite="pretrain: loss is {loss} at step {step}: lower train.lr",
    )
    optimizer, scaler = stepper.optimizer, stepper.scaler
    min_ratio = opts.min_lr / tc.lr if tc.lr > 0 else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, opts.schedule, min_ratio)
    )
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt_path = resume_path(out)
    settings = _settings(cfg, opts)
    say = progress or (lambda _line: None)

    step, seconds_before, history, tally = 0, 0.0, [], Tally()
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["settings"] != settings:
            raise ConfigError(
                f"pretrain: {ckpt_path} was written with other settings; delete it to start afresh "
                f"or give the same options and config (differs in: {_diff(ckpt['settings'], settings)})"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step, seconds_before, history = ckpt["step"], ckpt["seconds"], ckpt["history"]
        tally = Tally(**ckpt["tally"])
        say(f"pretrain: resuming {ckpt_path} at step {step}/{total} (epoch {step // per_epoch + 1})")

    def elapsed() -> float:
        return seconds_before + time.time() - t0

    def checkpoint() -> None:
        io.torch_save(
            ckpt_path,
            {
                "settings": settings,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "seconds": elapsed(),
                "history": history,
                "tally": dataclasses.asdict(tally),
            },
        )

    say(
        f"pretrain: {len(train)} examples, {opts.epochs} epoch(s) of {per_epoch} batches on {device}; "
        f"augment crop={padding or 'off'} flip={'on' if flip else 'off'}, {opts.schedule} lr {tc.lr} "
        f"({warmup} warm-up steps), label smoothing {opts.label_smoothing}"
    )
    model.train()
    while step < total:
        epoch, first = divmod(step, per_epoch)
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
        batches = [perm[i * bs : (i + 1) * bs].tolist() for i in range(first, per_epoch)]
        loader = torch.utils.data.DataLoader(train, batch_sampler=batches, num_workers=cfg.data.num_workers)
        for x, y in loader:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout / drop path
            x = augment_batch(x, padding, flip, gen).to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            loss, logits = stepper.step(x, y, step)
            scheduler.step()
            tally.add(loss, logits.detach(), y)
            step += 1
            if step % per_epoch == 0:
                r = tally.result(step)
                lr = optimizer.param_groups[0]["lr"]
                history.append(
                    {
                        "epoch": step // per_epoch,
                        "train_loss": round(r.loss, 4),
                        "train_acc": round(r.accuracy, 4),
                        "lr": lr,
                        "seconds": round(elapsed(), 1),
                    }
                )
                tally = Tally()
                checkpoint()
                say(
                    f"pretrain: epoch {step // per_epoch}/{opts.epochs}: train loss {r.loss:.4f}, "
                    f"acc {r.accuracy:.4f} (augmented), lr {lr:.2e} ({elapsed():.0f}s)"
                )
            elif opts.checkpoint_every and step % opts.checkpoint_every == 0:
                checkpoint()
                say(f"pretrain: checkpoint at step {step}/{total} ({elapsed():.0f}s)")

    test_loader = make_loader(test, tc.eval_batch_size, shuffle=False, workers=cfg.data.num_workers)
    ev = evaluate(model, test_loader, device)
    say(f"pretrain: test accuracy {ev.accuracy:.4f} on {ev.num_examples} test examples")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    io.torch_save(out, {"model": state})
    last = history[-1] if history else {}
    summary = {
        "path": str(out),
        "dataset": cfg.data.name,
        "examples": len(train),
        "test_examples": ev.num_examples,
        "epochs": opts.epochs,
        "steps": total,
        "train_loss": last.get("train_loss"),
        "train_acc": last.get("train_acc"),
        "test_loss": ev.loss,
        "test_acc": ev.accuracy,
        "seconds": round(elapsed(), 1),
        "augment": {"crop_padding": padding, "flip": flip},
        "warmup_steps": warmup,
        "options": dataclasses.asdict(opts),
        "train": to_dict(cfg)["train"],
        "data": settings["data"],
        "model": to_dict(cfg)["model"],
        "history": history,
    }
    io.write_json(summary_path(out), summary, indent=2, end="\n")
    ckpt_path.unlink(missing_ok=True)
    return summary


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys: list[str] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys
