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


#: ``forward(model, x, y) -> (loss, logits)``: the loss of one batch to minimise and the logits its
#: accuracy is counted on (default: ``model(x)`` and its cross-entropy). A model with several
#: outputs (early exits) returns its own loss and the logits of the output that counts.
Forward = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def loss_forward(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Forward:
    """The :data:`Forward` of a one-output model trained on ``loss_fn(model(x), y)``."""

    def forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return loss_fn(logits, y), logits

    return forward


class Stepper:
    """Optimizer steps as every training loop here takes them: the forward pass under AMP on CUDA
    (``tc.amp``; loss scaling for float16), a finite-loss check before the backward pass, gradient
    clipping to ``tc.grad_clip``. ``optimizer`` and ``scaler`` are attributes (checkpoints save them).

    ``nonfinite``: the error message of a NaN/Inf loss, with ``{loss}`` and ``{step}``."""

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter],
        tc: TrainConfig,
        device: torch.device,
        forward: Forward,
        nonfinite: str = "loss is {loss} at local step {step}: lower train.lr or check the data",
    ) -> None:
        self.model = model
        self.params = list(params)
        self.optimizer = make_optimizer(self.params, tc)
        self.autocast, amp_dtype = _autocast(device, tc.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        self.grad_clip = tc.grad_clip
        self.forward = forward
        self.nonfinite = nonfinite

    def step(self, x: torch.Tensor, y: torch.Tensor, index: int) -> tuple[float, torch.Tensor]:
        """One optimizer step on the batch ``(x, y)`` (step number ``index``, for the error
        message); its loss and the logits its accuracy is counted on."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss, logits = self.forward(self.model, x, y)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingError(self.nonfinite.format(loss=value, step=index))
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return value, logits


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
    forward: Forward | None = None,
    on_epoch: Callable[[int, TrainResult], None] | None = None,
) -> TrainResult:
    """Train ``params`` (default: all trainable parameters of ``model``) on ``loader``.

    ``on_epoch(epoch, running)`` is called after each full pass over ``loader`` (1-based) with
    the running loss and accuracy since the start (progress of long runs, e.g. ``fedvit pretrain``).

    Runs ``steps`` optimizer steps if given (cycling the loader), else ``epochs`` epochs
    (default: ``tc.local_steps`` or ``tc.local_epochs``). Each step is a :class:`Stepper`'s: AMP
    on CUDA when ``tc.amp``, the gradient norm clipped to ``tc.grad_clip``. The loss is
    ``loss_fn(model(x), y)`` (default: cross-entropy), or what ``forward(model, x, y)`` returns
    with the logits the accuracy is counted on (:data:`Forward`; not both).
    """
    if forward is not None and loss_fn is not None:
        raise ValueError("train_local: give loss_fn or forward, not both")
    if steps is None and epochs is None:
        steps, epochs = tc.local_steps, tc.local_epochs
    if len(loader.dataset) == 0:  # type: ignore[arg-type]
        raise TrainingError("empty training set")
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    stepper = Stepper(model, params, tc, device, forward or loss_forward(loss_fn or nn.CrossEntropyLoss()))
    on_device(model, device).train()
    tally = Tally()
    max_steps = steps if steps is not None else epochs * len(loader)  # type: ignore[operator]
    for step, (x, y) in enumerate(itertools.islice(cycle(loader), max_steps)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, logits = stepper.step(x, y, step)
        tally.add(loss, logits, y)
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
