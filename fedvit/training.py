"""Local training and evaluation loops shared by every client."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedvit.config import TrainConfig


class TrainingError(RuntimeError):
    """Local training diverged (NaN/Inf loss) or cannot run."""


@dataclass
class TrainResult:
    loss: float
    accuracy: float
    num_examples: int
    num_steps: int


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int
    correct: int


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda:N`` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"device '{name}' requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainingError(f"device '{name}' requested but only {torch.cuda.device_count()} GPUs exist")
    return device


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.to(device)``, skipped when its first parameter is already there (``.to`` walks every
    module even when nothing moves: a measurable share of a small client's message)."""
    first = next(model.parameters(), None)
    if first is not None and first.device == device and device.type == "cpu":
        return model
    return model.to(device)


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, workers: int = 0
) -> DataLoader:
    """A DataLoader whose shuffling is reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        drop_last=False,
    )


def cycle(loader: DataLoader) -> Iterator[Any]:
    """Batches of ``loader`` without end, epoch after epoch (each epoch reshuffled)."""
    while True:
        yield from loader


def count_steps(tc: TrainConfig, loader: DataLoader, batches_per_step: int = 1) -> int:
    """Local steps of a round: ``tc.local_steps``, else enough for ``tc.local_epochs`` passes."""
    if len(loader.dataset) == 0:  # type: ignore[arg-type]
        raise TrainingError("empty training set")
    if tc.local_steps is not None:
        return tc.local_steps
    return max(1, math.ceil(tc.local_epochs * len(loader) / batches_per_step))


@dataclass
class Tally:
    """Running loss / accuracy of local training."""

    loss: float = 0.0
    correct: int = 0
    seen: int = 0

    def add(self, loss: float, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss += loss * len(y)
        self.correct += int((logits.argmax(dim=1) == y).sum().item())
        self.seen += len(y)

    def result(self, steps: int) -> TrainResult:
        return TrainResult(
            loss=self.loss / self.seen,
            accuracy=self.correct / self.seen,
            num_examples=self.seen,
            num_steps=steps,
        )


def make_optimizer(params: Iterable[nn.Parameter], tc: TrainConfig) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW from the train config."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise TrainingError("no trainable parameters")
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype
    return nullcontext(), None


def train_local(
    model: nn.Module,
    loader: DataLoader,
    tc: TrainConfig,
    device: torch.device,
    *,
    params: Iterable[nn.Parameter] | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    loss_fn: nn.Module | None = None,
    on_epoch: Callable[[int, TrainResult], None] | None = None,
) -> TrainResult:
    """Train ``params`` (default: all trainable parameters of ``model``) on ``loader``.

    ``on_epoch(epoch, running)`` is called after each full pass over ``loader`` (1-based) with
    the running loss and accuracy since the start (progress of long runs, e.g. ``fedvit pretrain``).

    Runs ``steps`` optimizer steps if given (cycling the loader), else ``epochs`` epochs
    (default: ``tc.local_steps`` or ``tc.local_epochs``). Uses AMP on CUDA when
    ``tc.amp`` and clips the gradient norm to ``tc.grad_clip``.
    """
    if steps is None and epochs is None:
        steps, epochs = tc.local_steps, tc.local_epochs
    if len(loader.dataset) == 0:  # type: ignore[arg-type]
        raise TrainingError("empty training set")
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, tc)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    autocast, amp_dtype = _autocast(device, tc.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    on_device(model, device).train()
    tally = Tally()
    max_steps = steps if steps is not None else epochs * len(loader)  # type: ignore[operator]
    for step, (x, y) in enumerate(itertools.islice(cycle(loader), max_steps)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = model(x)
            loss = loss_fn(logits, y)
        if not math.isfinite(loss.item()):
            raise TrainingError(
                f"loss is {loss.item()} at local step {step}: lower train.lr or check the data"
            )
        scaler.scale(loss).backward()
        if tc.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        tally.add(loss.item(), logits, y)
        if on_epoch is not None and (step + 1) % len(loader) == 0:
            on_epoch((step + 1) // len(loader), tally.result(step + 1))
    return tally.result(max_steps)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> EvalResult:
    """Mean cross-entropy and top-1 accuracy of ``model`` on ``loader``."""
    on_device(model, device).eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
        seen += len(y)
    if seen == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0, correct=0)
    return EvalResult(loss=total_loss / seen, accuracy=correct / seen, num_examples=seen, correct=correct)
