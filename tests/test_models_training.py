"""The ViT builder (seeded init, local pretrained weights), the local training loop (epochs or
steps, only the given parameters move, divergence is caught) and resource counting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fedvit.config import FedvitConfig, load_config
from fedvit.evaluation import flops_per_sample, resource_counts, summarize
from fedvit.models import build_model, load_pretrained
from fedvit.params import ParameterSplit
from fedvit.training import TrainingError, evaluate, make_loader, resolve_device, train_local

CPU = torch.device("cpu")


def toy_data(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_the_same_seed_builds_the_same_model_everywhere() -> None:
    a, b = build_model(FedvitConfig()), build_model(FedvitConfig())
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    other = FedvitConfig()
    other.seed = 1
    assert not torch.equal(build_model(other).state_dict()["head.weight"], a.state_dict()["head.weight"])


def test_model_follows_the_dataset_and_model_config() -> None:
    cfg = load_config({"overrides": "model.depth=3 model.embed_dim=48 model.num_heads=3"})
    model = build_model(cfg)
    assert len(model.blocks) == 3 and model.embed_dim == 48
    assert model(torch.zeros(2, cfg.data.in_chans, 16, 16)).shape == (2, cfg.data.num_classes)


def test_pretrained_weights_load_from_a_local_file_and_a_new_head_is_kept_fresh(tmp_path: Path) -> None:
    source = build_model(FedvitConfig())
    torch.nn.init.constant_(source.blocks[0].attn.qkv.weight, 0.5)
    path = tmp_path / "backbone.pt"
    torch.save({"model": source.state_dict()}, path)
    cfg = FedvitConfig()
    cfg.data.num_classes = 7  # another dataset: the head does not fit
    target = build_model(cfg)
    skipped = load_pretrained(target, path)
    assert set(skipped) == {"head.weight", "head.bias"}
    assert torch.all(target.blocks[0].attn.qkv.weight == 0.5)
    assert target.head.weight.shape == (7, 64)


def test_local_steps_take_exactly_that_many_optimizer_steps() -> None:
    cfg = FedvitConfig()
    model = build_model(cfg)
    loader = make_loader(toy_data(40), 8, shuffle=True)  # 5 batches per epoch
    assert train_local(model, loader, cfg.train, CPU, steps=7).num_steps == 7
    assert train_local(model, loader, cfg.train, CPU, epochs=2).num_steps == 10


def test_only_the_given_parameters_change() -> None:
    cfg = FedvitConfig()
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(
        model,
        make_loader(toy_data(), 8, shuffle=True),
        cfg.train,
        CPU,
        params=model.head.parameters(),
        steps=3,
    )
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"head.weight", "head.bias"}


def test_training_lowers_the_loss_on_a_learnable_toy_task() -> None:
    cfg = FedvitConfig()
    cfg.model.depth, cfg.model.embed_dim, cfg.model.num_heads = 1, 16, 2
    model = build_model(cfg)
    x = torch.randn(64, 1, 16, 16)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    loader = make_loader(TensorDataset(x, y), 16, shuffle=True)
    start = evaluate(model, make_loader(TensorDataset(x, y), 64, shuffle=False), CPU).loss
    train_local(model, loader, cfg.train, CPU, epochs=8)
    assert evaluate(model, make_loader(TensorDataset(x, y), 64, shuffle=False), CPU).loss < start


def test_divergence_is_a_clear_error() -> None:
    cfg = FedvitConfig()
    model = build_model(cfg)
    data = toy_data(8)
    data.tensors[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"train\.lr"):
        train_local(model, make_loader(data, 8, shuffle=False), cfg.train, CPU, steps=1)


def test_asking_for_a_missing_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(TrainingError, match="CUDA is not available"):
        resolve_device("cuda:0")
    assert resolve_device("auto") == CPU


def test_resource_counts_match_a_hand_count() -> None:
    cfg = FedvitConfig()
    cfg.model.depth, cfg.model.embed_dim, cfg.model.num_heads, cfg.model.mlp_ratio = 1, 8, 2, 2.0
    cfg.data.num_classes, cfg.data.image_size = 3, 8
    model = build_model(cfg)
    split = ParameterSplit.from_model(model, ["head"])
    d, tokens = 8, (8 // 4) ** 2 + 1
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * d * d + 2 * d) + (2 * d * d + d)
    total = (d * 16 + d) + (tokens * d + d) + block + 2 * d + (3 * d + 3)
    res = resource_counts(model, split, (1, 8, 8))
    assert res["params_stored_per_client"] == total == sum(p.numel() for p in model.parameters())
    assert res["params_private_per_client"] == 2 * d + 3 * d + 3
    assert res["params_sent_up_per_round"] == total - res["params_private_per_client"]
    # matmul FLOPs: patch projection, qkv, attention scores and mix, proj, MLP, head (x2 per MAC)
    macs = (tokens - 1) * 16 * d + tokens * (3 * d * d + d * d + 4 * d * d) + 2 * tokens * tokens * d + d * 3
    assert flops_per_sample(model, (1, 8, 8)) == 2 * macs


def test_summary_statistics_over_clients() -> None:
    s = summarize({0: 0.2, 1: 0.4, 2: 0.9, 3: float("nan")}, {0: 10, 1: 30, 2: 60, 3: 5})
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(0.5)
    assert s["weighted_mean"] == pytest.approx((2 + 12 + 54) / 100)
    assert s["q50"] == pytest.approx(0.4)
    assert s["min"] == 0.2 and s["max"] == 0.9
