"""train_local's ``forward`` hook: a model with several outputs (early exits) trains in the one
loop, with its own loss, gradient clipping and (on CUDA) AMP, and its accuracy counted on the
output the hook names. On CPU it is bit for bit the hand-written loop it replaces."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fedvit.config import TrainConfig
from fedvit.training import TrainingError, cycle, make_loader, make_optimizer, train_local

CPU = torch.device("cpu")


class TwoExits(nn.Module):
    """A body and two heads: ``forward_exits`` gives both logits, the deeper one last."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.early, self.late = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.relu(self.body(x))
        return [self.early(h), self.late(h)]


def exit_forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model.forward_exits(x)
    return sum(F.cross_entropy(z, y) for z in logits), logits[-1]  # type: ignore[return-value]


def data(n: int = 24) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def reference_loop(model: TwoExits, loader, tc: TrainConfig, steps: int) -> tuple[float, float]:
    """The multi-exit loop clients/anytime.py wrote out by hand (no AMP)."""
    params = list(model.parameters())
    optimizer = make_optimizer(params, tc)
    total, correct, seen = 0.0, 0, 0
    for x, y in itertools.islice(cycle(loader), steps):
        optimizer.zero_grad(set_to_none=True)
        loss, last = exit_forward(model, x, y)
        loss.backward()
        if tc.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        optimizer.step()
        total += loss.item() * len(y)
        correct += int((last.argmax(1) == y).sum().item())
        seen += len(y)
    return total / seen, correct / seen


@pytest.mark.parametrize("grad_clip", [None, 0.05])
def test_forward_hook_matches_the_hand_written_multi_exit_loop(grad_clip: float | None) -> None:
    tc = TrainConfig(lr=0.1, grad_clip=grad_clip)
    ours, theirs = TwoExits(), TwoExits()
    result = train_local(
        ours, make_loader(data(), 8, shuffle=True, seed=3), tc, CPU, steps=7, forward=exit_forward
    )
    loss, acc = reference_loop(theirs, make_loader(data(), 8, shuffle=True, seed=3), tc, 7)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert (result.loss, result.accuracy, result.num_steps) == (loss, acc, 7)


def test_accuracy_is_counted_on_the_logits_the_hook_returns() -> None:
    model = TwoExits()
    with torch.no_grad():  # the early exit always right, the late one always wrong
        model.early.weight.zero_()
        model.late.weight.zero_()
        model.early.bias.copy_(torch.tensor([9.0, 0, 0]))
        model.late.bias.copy_(torch.tensor([0, 9.0, 0]))
    x = torch.randn(8, 6)
    loader = make_loader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), 8, shuffle=False)
    tc = TrainConfig(lr=0.0)

    def early(m, x, y):
        logits = m.forward_exits(x)
        return F.cross_entropy(logits[0], y), logits[0]

    assert train_local(model, loader, tc, CPU, steps=1, forward=early).accuracy == 1.0
    assert train_local(model, loader, tc, CPU, steps=1, forward=exit_forward).accuracy == 0.0


def test_a_non_finite_loss_from_the_hook_stops_training_before_any_step() -> None:
    model = TwoExits()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_loss(m, x, y):
        _, last = exit_forward(m, x, y)
        return last.sum() * float("nan"), last

    loader = make_loader(data(), 8, shuffle=False)
    with pytest.raises(TrainingError, match=r"loss is nan at local step 0: lower train\.lr"):
        train_local(model, loader, TrainConfig(), CPU, steps=3, forward=nan_loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_loss_fn_and_forward_are_exclusive() -> None:
    with pytest.raises(ValueError, match="not both"):
        train_local(
            TwoExits(),
            make_loader(data(), 8, shuffle=False),
            TrainConfig(),
            CPU,
            loss_fn=nn.CrossEntropyLoss(),
            forward=exit_forward,
        )
