"""FedTP: a server hypernetwork generates each client's Q/K/V; the rest is FedAvg. The
hypernetwork update (sign, weights), the per-client messages, the never-averaged Q/K/V,
checkpoints, and the sizes of the full and factored output heads."""

from __future__ import annotations

import json
from pathlib import Path

import fedhelpers
import numpy as np
import pytest
import torch

from fedvit.config import ConfigError, load_config
from fedvit.hypernet import (
    HypernetConfig,
    HypernetSGD,
    WeightHypernet,
    hypernet_num_parameters,
    hypernet_step,
)
from fedvit.models import build_model
from fedvit.params import ParameterSplit, parameter_groups
from strategies.base import ClientUpdate, to_record
from strategies.fedtp import FedTPStrategy

TINY_MODEL = (
    "model.depth=2 model.embed_dim=16 model.num_heads=2 data.max_train_per_client=60 "
    "train.batch_size=32 train.local_epochs=1"
)
TINY = f"{TINY_MODEL} method.options.embed_dim=8 method.options.hidden=16"
QKV = [f"blocks.{i}.attn.qkv.{t}" for i in range(2) for t in ("weight", "bias")]


def run_config(tmp_path: Path, method: str = "fedtp", rounds: int = 1, extra: str = "", **keys) -> dict:
    return fedhelpers.run_config(tmp_path, method, TINY, rounds, extra, **keys)


def strategy_for(tmp_path: Path, extra: str = "", method: str = "fedtp") -> FedTPStrategy:
    cfg = load_config(run_config(tmp_path, method, extra=extra))
    model = build_model(cfg)
    split = ParameterSplit.from_model(model, cfg.method.private)
    return FedTPStrategy.from_config(
        cfg, model=model, split=split, recorder=None, run_dir=tmp_path / "run", run_name="t"
    )


# --------------------------------------------------------------------------- in a federation


def test_clients_receive_their_own_qkv_and_the_same_everything_else(
    tmp_path: Path, received, train_replies
) -> None:
    _, results, _ = fedhelpers.federate(run_config(tmp_path, rounds=2))
    assert results["status"] == "completed"
    assert results["resources"]["hypernetwork_params"] > 0
    first = {cid: a for kind, cid, a in received[:3] if kind == "train"}
    assert sorted(first) == [0, 1, 2]
    assert set(first[0]) == set(build_model(load_config(run_config(tmp_path))).state_dict())
    for key in first[0]:
        same = np.array_equal(first[0][key], first[1][key])
        assert same == (key not in QKV), key  # Q/K/V differ per client, the rest is identical


def test_qkv_are_never_averaged_and_evaluation_uses_each_clients_generated_qkv(
    tmp_path: Path, received, train_replies
) -> None:
    fedhelpers.federate(run_config(tmp_path, rounds=1))
    returned = {cid: {k: v.numpy() for k, v in r.content["arrays"].items()} for cid, r in train_replies}
    evaluated = {cid: a for kind, cid, a in received if kind == "evaluate"}
    sizes = {cid: r.content["metrics"]["num-examples"] for cid, r in train_replies}
    total = sum(sizes.values())
    for key in ("blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight"):
        mean = sum(returned[c][key].astype(np.float64) * sizes[c] / total for c in returned)
        if key in QKV:
            assert not np.allclose(evaluated[0][key], mean, atol=1e-6)
            assert not np.array_equal(evaluated[0][key], evaluated[1][key])
        else:  # the shared part is the sample-weighted mean, identical for everyone
            np.testing.assert_allclose(evaluated[0][key], mean, rtol=1e-5, atol=1e-6)
            assert np.array_equal(evaluated[0][key], evaluated[1][key])


def test_fedtp_per_keeps_the_head_at_home_and_fedtp_vanilla_keeps_qkv(tmp_path: Path, train_replies) -> None:
    fedhelpers.federate(run_config(tmp_path, "fedtp-per"))
    sent = set(train_replies[0][1].content["arrays"].keys())
    assert "head.weight" not in sent and set(QKV) <= sent
    vanilla = load_config(fedhelpers.run_config(tmp_path, "fedtp-vanilla", TINY_MODEL))
    model = build_model(vanilla)
    split = ParameterSplit.from_model(model, vanilla.method.private)
    assert set(split.private) == set(QKV) and "head.weight" in split.shared


def test_resume_restores_the_hypernetwork_and_its_optimizer(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    _, _, run_dir = fedhelpers.federate(run_config(straight, rounds=3))
    cut = tmp_path / "cut"
    _, _, cut_dir = fedhelpers.federate(run_config(cut, rounds=2))
    fedhelpers.federate(run_config(cut, rounds=3, resume=str(cut_dir)))
    with (
        np.load(run_dir / "checkpoint" / "strategy.npz") as a,
        np.load(cut_dir / "checkpoint" / "strategy.npz") as b,
    ):
        assert set(a.files) == set(b.files) and any(k.startswith("opt.") for k in a.files)
        for k in a.files:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    state = json.loads((cut_dir / "checkpoint" / "state.json").read_text())
    assert state["round"] == 3 and state["state"]["trained"] == [0, 1, 2]


# --------------------------------------------------------------------------- the update rule


def quadratic_clients(n: int = 3):
    rng = np.random.default_rng(0)
    init = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    targets = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(n)]
    return init, targets


def test_one_hypernetwork_step_lowers_every_clients_loss_at_its_new_weights() -> None:
    """Client i's loss is |W - T_i|^2; local training takes one gradient step (lr 0.1), so
    Δ_i = sent - returned = 0.1 * ∇L_i. Descending along J^T Δ must lower every loss."""
    init, targets = quadratic_clients()
    hnet = WeightHypernet(3, init, HypernetConfig(embed_dim=4, hidden=8, n_hidden=1, init_gain=1.0))
    opt = HypernetSGD(hnet, lr=0.05)

    def loss(cid: int) -> float:
        return float(((hnet.generate(cid)["w"] - targets[cid]) ** 2).sum())

    before = [loss(c) for c in range(3)]
    changes = []
    for c in range(3):
        sent = hnet.generate(c)["w"]
        returned = sent - 0.1 * 2 * (sent - targets[c])
        changes.append((c, 1 / 3, {"w": sent - returned}))
    hypernet_step(hnet, opt, changes)
    after = [loss(c) for c in range(3)]
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)


def test_the_gradient_is_the_weighted_vector_jacobian_product() -> None:
    init, _ = quadratic_clients()
    hnet = WeightHypernet(2, init, HypernetConfig(embed_dim=3, hidden=5, n_hidden=0))
    delta = np.ones((4, 3), dtype=np.float32)
    w0 = {k: v.detach().clone() for k, v in hnet.named_parameters()}
    hypernet_step(hnet, HypernetSGD(hnet, lr=1.0), [(1, 0.5, {"w": delta})])
    # Head bias: dW/db = I, so the step is lr * weight * Δ exactly; client 0's embedding is untouched.
    bias = hnet.heads[0].linear.bias
    torch.testing.assert_close(bias, w0["heads.0.linear.bias"] - 0.5 * torch.ones(12))
    torch.testing.assert_close(hnet.embeddings.weight[0], w0["embeddings.weight"][0])
    assert not torch.equal(hnet.embeddings.weight[1], w0["embeddings.weight"][1])


def test_strategy_checkpoint_round_trip_keeps_momentum(tmp_path: Path) -> None:
    a = strategy_for(tmp_path)
    sent = a.generate(0)
    a.sent = {0: sent}
    returned = {k: v - 0.01 for k, v in sent.items()}
    shared = {k: np.zeros(s, np.float32) for k, s in a.shared_shapes.items()}
    update = ClientUpdate(0, 10, {**shared, **returned}, 5)
    a.check_update(update)
    a.aggregate_shared(1, [update], to_record(shared))
    arrays, state = a.state_dict()
    b = strategy_for(tmp_path)
    b.load_state_dict(arrays, json.loads(json.dumps(state)))
    assert b.trained == [0] and b.optimizer.buffers.keys() == a.optimizer.buffers.keys()
    for k in a.generate(1):
        np.testing.assert_array_equal(a.generate(1)[k], b.generate(1)[k])
    other = strategy_for(tmp_path, extra="method.options.head=basis")
    with pytest.raises(ValueError, match="head"):
        other.load_state_dict(arrays, state)


# --------------------------------------------------------------------------- config and sizes


def test_a_client_that_never_trained_gets_the_mean_embedding() -> None:
    init, _ = quadratic_clients()
    hnet = WeightHypernet(4, init, HypernetConfig(embed_dim=3, hidden=5))
    mean = hnet.embeddings.weight[[0, 2]].mean(0)
    torch.testing.assert_close(hnet.embedding_of(3, trained=[0, 2]), mean)
    torch.testing.assert_close(hnet.embedding_of(2, trained=[0, 2]), hnet.embeddings.weight[2])


def test_generated_groups_must_exist_and_not_be_private(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"method\.options\.generated"):
        strategy_for(tmp_path, method="fedtp-per", extra="method.options.generated=[head]")
    with pytest.raises(ConfigError, match=r"method\.options\.head"):
        load_config(run_config(tmp_path, extra="method.options.head=lowrank"))


@pytest.mark.parametrize("head", ["full", "basis"])
def test_the_size_formula_counts_the_built_hypernetwork(head: str) -> None:
    shapes = {"a": (12, 4), "b": (12,)}
    init = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    cfg = HypernetConfig(embed_dim=5, hidden=7, n_hidden=2, head=head, basis_size=3)
    assert WeightHypernet(6, init, cfg).num_parameters() == hypernet_num_parameters(6, shapes, cfg)


def test_at_the_reference_vit_the_full_heads_hold_178m_and_the_basis_cuts_ten_fold() -> None:
    """FedTP's reference ViT: width 128, attention inner width 512, depth 6, no qkv bias."""
    qkv = {f"blocks.{i}.attn.qkv.weight": (3 * 512, 128) for i in range(6)}
    full = hypernet_num_parameters(20, qkv, HypernetConfig())
    basis = hypernet_num_parameters(20, qkv, HypernetConfig(head="basis"))
    assert 177e6 < full < 179e6
    assert full / basis >= 10


def test_generated_tensors_start_near_the_models_init(tmp_path: Path) -> None:
    s = strategy_for(tmp_path)
    init = build_model(load_config(run_config(tmp_path))).state_dict()
    for k, v in s.generate(0).items():
        ref = init[k].numpy()
        assert v.shape == ref.shape
        assert np.abs(v - ref).mean() < 0.5 * np.abs(ref).mean() + 0.05
    groups = parameter_groups(build_model(load_config(run_config(tmp_path))))
    assert set(s.generated_shapes) == set(groups["attn.qkv"])
