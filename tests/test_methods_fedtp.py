"""FedTP: a server hypernetwork generates each client's Q/K/V; the rest is FedAvg. The
hypernetwork update (sign, weights, and the point it is taken at), the per-client messages
(training always from the client's own embedding, also under partial participation), the
never-averaged Q/K/V, checkpoints, and the sizes of the full and factored output heads."""

from __future__ import annotations

import json
from pathlib import Path

import fedhelpers
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

import strategies.fedtp
from fedvit.config import ConfigError, load_config
from fedvit.hypernet import (
    HypernetConfig,
    HypernetSGD,
    WeightHypernet,
    hypernet_num_parameters,
    hypernet_step,
)
from fedvit.inprocess import InProcessGrid
from fedvit.models import build_model
from fedvit.params import ParameterSplit, parameter_groups
from strategies.base import ClientUpdate, RoundPlan, to_record
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
    # No hypernetwork weight decay: its step is then the weighted VJP alone (the sign check below).
    fedhelpers.federate(run_config(tmp_path, rounds=1, extra="method.options.hn_weight_decay=0"))
    sent = {cid: a for kind, cid, a in received if kind == "train"}
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
    # Evaluation uses the hypernetwork *after* its step: every client's Q/K/V moved from what it
    # trained from, and towards what the clients returned, in the weighted sum over clients (to
    # first order it is hn_lr·|Σ_i w_i J_iᵀΔ_i|² > 0; a single client may move away, pulled by others).
    toward = 0.0
    for c in sent:
        for key in QKV:
            assert not np.array_equal(evaluated[c][key], sent[c][key]), (c, key)
            moved = evaluated[c][key].astype(np.float64) - sent[c][key]
            toward += sizes[c] / total * float((moved * (returned[c][key] - sent[c][key])).sum())
    assert toward > 0, toward


def test_with_partial_participation_a_client_trains_from_its_own_embedding_where_the_step_is_taken(
    tmp_path: Path, received, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some of three clients per round (fraction-train < 1): every training message, also a
    client's first one after others trained, carries W generated from the client's own embedding,
    the hypernetwork step differentiates at exactly that W, and results.json says which clients
    were evaluated with the mean embedding. The rounds' samples are scripted (the seeded sampler is
    not under test, and with 3 clients it may pick the same one for several rounds)."""
    schedule = {1: [0], 2: [1], 3: [0, 2], 4: [1]}  # 1 and 2 first train after others did

    def scripted(self: FedTPStrategy, server_round: int, grid) -> list[int]:
        node_of = {cid: node for node, cid in self.node_to_client.items()}
        return [node_of[cid] for cid in schedule[server_round]]

    steps: list[dict] = []
    real_step = strategies.fedtp.hypernet_step

    def spy(hnet: WeightHypernet, optimizer: HypernetSGD, changes) -> None:
        own = {cid: hnet.generate(cid) for cid, _, _ in changes}
        at_step: list[dict[str, np.ndarray]] = []
        hook = hnet.register_forward_hook(
            lambda module, args, out: at_step.append({k: v.detach().numpy().copy() for k, v in out.items()})
        )
        try:
            real_step(hnet, optimizer, changes)
        finally:
            hook.remove()
        clients = [cid for cid, _, _ in changes]
        steps.append({"own": own, "at_step": dict(zip(clients, at_step, strict=True)), "seen": len(received)})

    monkeypatch.setattr(FedTPStrategy, "sample_nodes", scripted)
    monkeypatch.setattr(strategies.fedtp, "hypernet_step", spy)
    _, results, _ = fedhelpers.federate(run_config(tmp_path, rounds=4, **{"fraction-train": 0.34}))
    assert len(steps) == 4

    trained: set[int] = set()
    start = 0
    for rnd, step in enumerate(steps, start=1):
        messages = {cid: a for kind, cid, a in received[start : step["seen"]] if kind == "train"}
        start = step["seen"]
        assert sorted(messages) == sorted(step["at_step"]) == schedule[rnd]
        for cid, arrays in messages.items():
            for key in QKV:
                np.testing.assert_allclose(arrays[key], step["own"][cid][key], rtol=1e-6, atol=1e-7)
                np.testing.assert_allclose(arrays[key], step["at_step"][cid][key], rtol=1e-6, atol=1e-7)
        trained |= set(messages)
        evaluated = results["rounds"][rnd - 1]["eval"]["per_client"]
        flags = {int(c): m["mean-embedding"] for c, m in evaluated.items()}
        assert flags == {c: float(c not in trained) for c in range(3)}, (rnd, trained)


def test_unseen_embedding_own_evaluates_a_never_trained_client_with_its_own_embedding(tmp_path: Path) -> None:
    mean = strategy_for(tmp_path)
    own = strategy_for(tmp_path, extra="method.options.unseen_embedding=own")
    for s in (mean, own):
        s.trained = [0, 1]
    w_mean, from_mean = mean.generate_for_evaluation(2)
    w_own, not_from_mean = own.generate_for_evaluation(2)
    assert from_mean and not not_from_mean
    for k in QKV:
        np.testing.assert_array_equal(w_own[k], own.generate(2)[k])
        assert not np.array_equal(w_mean[k], w_own[k])
    assert mean.generate_for_evaluation(1)[1] is False  # a trained client: always its own
    with pytest.raises(ConfigError, match=r"method\.options\.unseen_embedding"):
        load_config(run_config(tmp_path, extra="method.options.unseen_embedding=random"))


def test_fedtp_per_keeps_the_classifier_at_home_and_fedtp_vanilla_keeps_qkv(
    tmp_path: Path, train_replies
) -> None:
    """FedTP-Per, as the authors: only the linear classifier is private; the pre-head norm is shared."""
    fedhelpers.federate(run_config(tmp_path, "fedtp-per"))
    sent = set(train_replies[0][1].content["arrays"].keys())
    assert {"head.weight", "head.bias"}.isdisjoint(sent) and set(QKV) <= sent
    assert {"norm.weight", "norm.bias"} <= sent
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


def train_plan(s: FedTPStrategy, client: int, shared: dict[str, np.ndarray]) -> RoundPlan:
    """Round 1's plan when only ``client`` is connected: what the strategy sent it to train."""
    grid = InProcessGrid({}, 1, client_app=lambda msg, ctx: msg)
    s.node_to_client = {node: client for node in grid.contexts}
    messages, plan = s.configure_train(1, to_record(shared), ConfigRecord(), grid)
    sent = {k: v.numpy() for k, v in messages[0].content["arrays"].items()}
    assert plan.sent[client].note["generated"].keys() == s.generated_shapes.keys()
    for k, w in plan.sent[client].note["generated"].items():
        np.testing.assert_array_equal(sent[k], w)  # the note is exactly the W_i that was sent
    return plan


def test_the_strategys_step_moves_a_clients_generated_qkv_toward_what_it_returned(tmp_path: Path) -> None:
    """Δ = sent − returned where the strategy computes it: after one round the client's newly
    generated Q/K/V are closer to what it returned than what it was sent (a flipped Δ moves them away)."""
    s = strategy_for(tmp_path)
    rng = np.random.default_rng(0)
    shared = {k: np.zeros(sh, np.float32) for k, sh in s.shared_shapes.items()}
    plan = train_plan(s, 1, shared)
    sent = plan.sent[1].note["generated"]
    returned = {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in sent.items()}
    update = ClientUpdate(1, 10, {**shared, **returned}, 5)
    s.check_update(update, plan.sent[1])
    s.aggregate_shared(plan, [update])
    after = s.generate(1)
    moved = sum(float(((after[k] - sent[k]) * (returned[k] - sent[k])).sum()) for k in sent)
    gap_before = sum(float(((returned[k] - sent[k]) ** 2).sum()) for k in sent)
    gap_after = sum(float(((returned[k] - after[k]) ** 2).sum()) for k in sent)
    assert moved > 0 and gap_after < gap_before, (moved, gap_before, gap_after)


def test_strategy_checkpoint_round_trip_keeps_momentum(tmp_path: Path) -> None:
    a = strategy_for(tmp_path)
    shared = {k: np.zeros(s, np.float32) for k, s in a.shared_shapes.items()}
    plan = train_plan(a, 0, shared)
    sent = plan.sent[0].note["generated"]
    returned = {k: v - 0.01 for k, v in sent.items()}
    update = ClientUpdate(0, 10, {**shared, **returned}, 5)
    a.check_update(update, plan.sent[0])
    a.aggregate_shared(plan, [update])
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


def test_generation_uses_the_own_embedding_unless_asked_for_the_mean_of_others() -> None:
    init, _ = quadratic_clients()
    hnet = WeightHypernet(4, init, HypernetConfig(embed_dim=3, hidden=5))
    mean = hnet.embeddings.weight[[0, 2]].mean(0)
    torch.testing.assert_close(hnet.mean_embedding([0, 2]), mean)
    torch.testing.assert_close(hnet.embedding_of(3), hnet.embeddings.weight[3])
    with torch.no_grad():
        from_mean = hnet(mean)["w"].numpy()
        from_own = hnet(hnet.embeddings.weight[3])["w"].numpy()
    np.testing.assert_allclose(hnet.generate(3, mean_of=[0, 2])["w"], from_mean, rtol=1e-6)
    np.testing.assert_allclose(hnet.generate(3)["w"], from_own, rtol=1e-6)
    with pytest.raises(ValueError, match="no clients"):
        hnet.mean_embedding([])


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
