"""pFedLA / HeurpFedLA: per-client hypernetworks give layer-wise aggregation weights α_i^l over
all clients' stored models. What α looks like, the update's sign (the unofficial codes disagree),
that the client trains on the aggregate θ̄_i and not its stored θ_i (one unofficial code
overwrites it), HeurpFedLA's kept-local layers, the on-disk store across checkpoints and crashes,
and the memory benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import fedhelpers
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from fedvit.config import ConfigError, load_config
from fedvit.inprocess import InProcessGrid
from fedvit.layeragg import LayerAggregation, aggregation_layers
from fedvit.models import build_model
from fedvit.params import ParameterSplit
from strategies.base import ClientUpdate, to_record
from strategies.pfedla import STORE_DIR, PFedLAStrategy

TINY_MODEL = (
    "model.depth=2 model.embed_dim=16 model.num_heads=2 data.max_train_per_client=40 "
    "train.batch_size=32 train.local_epochs=1"
)
TINY = f"{TINY_MODEL} method.options.embed_dim=8 method.options.hidden=16"


def run_config(tmp_path: Path, method: str = "pfedla", rounds: int = 1, extra: str = "", **keys) -> dict:
    return fedhelpers.run_config(tmp_path, method, TINY, rounds, extra, **keys)


def strategy_for(tmp_path: Path, extra: str = "", method: str = "pfedla", **kwargs) -> PFedLAStrategy:
    cfg = load_config(run_config(tmp_path, method, extra=extra))
    model = build_model(cfg)
    split = ParameterSplit.from_model(model, cfg.method.private)
    return PFedLAStrategy.from_config(
        cfg, model=model, split=split, recorder=None, run_dir=tmp_path / "run", run_name="t", **kwargs
    )


def toy(tmp_path: Path, n: int = 3, heur_k: int = 0, lr: float = 0.05, **kw) -> LayerAggregation:
    """N clients, 4 one-tensor layers, every stored θ_j distinct (version 1)."""
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 2), "b": (4,), "c": (2, 2), "d": (5,)}
    init = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    agg = LayerAggregation(
        {k: [k] for k in shapes}, init, n, tmp_path / "store", embed_dim=4, hidden=8, n_layers=2,
        hn_lr=lr, heur_k=heur_k, **kw,
    )  # fmt: skip
    for j in range(n):
        agg.store.write(j, {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}, 1)
    return agg


# --------------------------------------------------------------------------- α


def test_alpha_rows_are_non_negative_and_sum_to_one_per_layer(tmp_path: Path) -> None:
    agg = toy(tmp_path, n=5)
    for i in range(5):
        alpha = agg.weights(i)
        assert alpha.shape == (4, 5)
        assert (alpha >= 0).all()
        np.testing.assert_allclose(alpha.sum(axis=1), 1.0, rtol=1e-6)
    with torch.no_grad():  # a layer whose head outputs only zeros falls back to one-hot on self
        agg.hnets[2].heads[1].weight.fill_(-1.0)
    assert agg.weights(2)[1].tolist() == [0, 0, 1, 0, 0]


def test_one_hot_self_weights_make_it_local_the_message_is_exactly_the_stored_model(tmp_path: Path) -> None:
    agg = toy(tmp_path, n=4)
    for hn in agg.hnets:
        with torch.no_grad():
            for head in hn.heads:
                head.weight.zero_()
                head.bias.zero_()
                head.bias[hn.client_id] = 1.0
    for i in range(4):
        np.testing.assert_array_equal(agg.weights(i), np.eye(4)[[i] * 4])
        message, own = agg.personalized(i), agg.store.get(i)
        for k in own:
            assert np.array_equal(message[k], own[k]), k


def test_block_layers_are_input_each_block_and_output(tmp_path: Path) -> None:
    cfg = load_config(run_config(tmp_path))
    model = build_model(cfg)
    keys = list(model.state_dict())
    layers = aggregation_layers(model, keys)
    assert list(layers) == ["input", "blocks.0", "blocks.1", "output"]
    inputs = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert set(layers["input"]) == inputs
    assert all(k.startswith("blocks.1.") for k in layers["blocks.1"])
    assert set(layers["output"]) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert sorted(k for ks in layers.values() for k in ks) == sorted(keys)
    assert list(aggregation_layers(model, keys, "tensor")) == keys
    private = aggregation_layers(model, [k for k in keys if not k.startswith("head")])
    assert set(private["output"]) == {"norm.weight", "norm.bias"}  # private keys are no layer's
    with pytest.raises(ConfigError, match=r"method\.options\.granularity"):
        load_config(run_config(tmp_path, extra="method.options.granularity=row"))


# --------------------------------------------------------------------------- the update rule


def test_alpha_gradient_is_the_loss_gradient_times_the_local_lr(tmp_path: Path) -> None:
    """Δ = θ̄ − (θ̄ − lr ∇L(θ̄)) = lr ∇L; <θ_j^l, Δ^l> must be lr · ∂L/∂α_j^l (autograd)."""
    agg = toy(tmp_path)
    target = {k: np.ones(s, np.float32) for k, s in agg.store.shapes.items()}
    flat_t = torch.as_tensor(agg.store.flatten(target), dtype=torch.float64)
    thetas = torch.stack([torch.as_tensor(agg.store.read(j), dtype=torch.float64) for j in range(3)])
    alpha = torch.as_tensor(agg.weights(0), dtype=torch.float64).requires_grad_()
    sizes = [b - a for a, b in agg.bounds]
    per_element = torch.repeat_interleave(alpha, torch.tensor(sizes), dim=0)  # [P, N]
    mixed = (per_element * thetas.T).sum(1)
    ((mixed - flat_t) ** 2).sum().backward()
    sent = agg.personalized_flat(0).astype(np.float64)
    delta = 0.1 * 2 * (sent - flat_t.numpy())
    np.testing.assert_allclose(agg.alpha_gradient(delta), 0.1 * alpha.grad.numpy(), rtol=1e-5, atol=1e-8)


def test_one_step_lowers_every_clients_loss_at_its_next_aggregate(tmp_path: Path) -> None:
    """Toy quadratic L_i(θ) = |θ − T_i|²; the client takes one gradient step from θ̄_i. After
    HN_i's step (store as it was), client i's loss at its new θ̄_i is lower: descent, not ascent."""
    agg = toy(tmp_path, n=3, lr=0.02)
    rng = np.random.default_rng(1)
    targets = [rng.normal(size=agg.store.size) for _ in range(3)]
    before_versions = list(agg.store.versions)

    def loss(i: int) -> float:
        return float(((agg.personalized_flat(i, before_versions) - targets[i]) ** 2).sum())

    before = [loss(i) for i in range(3)]
    for i in range(3):
        sent = agg.personalized_flat(i, before_versions).astype(np.float64)
        returned = (sent - 0.1 * 2 * (sent - targets[i])).astype(np.float32)
        agg.update(i, returned, version=2, versions=before_versions)
        np.testing.assert_array_equal(agg.store.read(i), returned)  # θ_i ← the trained model
    after = [loss(i) for i in range(3)]
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)


def test_heurpfedla_keeps_exactly_k_layers_local_and_does_not_update_their_heads(tmp_path: Path) -> None:
    agg = toy(tmp_path, n=3, heur_k=2, hn_momentum=0.9)
    for i in range(3):
        with torch.no_grad():
            free = agg.hnets[i]()[:, i].numpy()
        local = agg.local_layers(i)
        assert len(local) == 2 and set(local) == set(np.argsort(-free)[:2].tolist())
        alpha = agg.weights(i)
        one_hot = [layer for layer in range(4) if alpha[layer].tolist() == np.eye(3)[i].tolist()]
        assert one_hot == local
        message, own = agg.personalized(i), agg.store.get(i)
        for layer in local:
            name = agg.layer_names[layer]
            assert np.array_equal(message[name], own[name])
        heads = [h.weight.detach().clone() for h in agg.hnets[i].heads]
        sent = agg.personalized_flat(i)
        agg.update(i, sent - 0.01, version=2)
        for layer, (old, head) in enumerate(zip(heads, agg.hnets[i].heads, strict=True)):
            assert torch.equal(old, head.weight) == (layer in local), layer
            assert (f"heads.{layer}.weight" in agg.optimizers[i].buffers) == (layer not in local)


# --------------------------------------------------------------------------- store and checkpoints


def test_checkpoint_round_trip_restores_hypernetworks_momentum_and_the_store_after_a_crash(
    tmp_path: Path,
) -> None:
    a = strategy_for(tmp_path, extra="method.options.hn_momentum=0.9")
    a.checkpoint_dir = tmp_path / "run" / "checkpoint"
    shapes = a.shared_shapes

    current = to_record({k: np.zeros(v, np.float32) for k, v in shapes.items()})

    def train_round(s: PFedLAStrategy, rnd: int) -> None:
        grid = InProcessGrid({}, 2, client_app=lambda msg, ctx: msg)  # clients 0 and 1 are connected
        s.node_to_client = {node: c for c, node in enumerate(sorted(grid.contexts))}
        messages, plan = s.configure_train(rnd, current, ConfigRecord(), grid)
        assert plan.note["versions"] == tuple(s.agg.store.versions)  # what θ̄_i are built from
        updates = []
        for msg in messages:
            c = s.node_to_client[msg.metadata.dst_node_id]
            sent = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            updates.append(
                ClientUpdate(c, msg.metadata.dst_node_id, {k: v - 0.01 * (c + 1) for k, v in sent.items()}, 5)
            )
            s.check_update(updates[-1], plan.sent[c])
        assert s.aggregate_shared(plan, updates) is current  # no global model: passed through

    train_round(a, 1)
    a.save_checkpoint(1, current)
    expected = {c: a.agg.personalized(c) for c in range(3)}
    store = tmp_path / "run" / STORE_DIR
    assert sorted(p.name for p in store.iterdir()) == ["client-0.v1.npy", "client-1.v1.npy", "initial.npy"]
    train_round(a, 2)  # ... and the server dies before checkpointing round 2
    assert (store / "client-0.v2.npy").exists() and (store / "client-0.v1.npy").exists()

    b = strategy_for(tmp_path, extra="method.options.hn_momentum=0.9")
    assert b.load_checkpoint(tmp_path / "run" / "checkpoint")[0] == 1
    assert b.trained == [0, 1] and b.agg.store.versions == [1, 1, 0]
    assert not (store / "client-0.v2.npy").exists()
    assert b.agg.optimizers[0].buffers.keys() == a.agg.optimizers[0].buffers.keys() != set()
    for c in range(3):
        got = b.agg.personalized(c)
        for k in expected[c]:
            np.testing.assert_array_equal(got[k], expected[c][k])
    arrays, state = b.state_dict()
    other = strategy_for(tmp_path / "o", extra="method.options.granularity=tensor")
    with pytest.raises(ValueError, match="granularity"):
        other.load_state_dict(arrays, json.loads(json.dumps(state)))
    res = b.server_resources()
    assert res["model_store_params"] == 3 * b.agg.store.size and res["hypernetwork_params"] > 0


# --------------------------------------------------------------------------- in a federation


def test_clients_receive_and_train_on_the_aggregate_not_their_stored_model(
    tmp_path: Path, received, train_replies
) -> None:
    _, results, run_dir = fedhelpers.federate(run_config(tmp_path, rounds=2))
    assert results["status"] == "completed"
    assert results["resources"]["hypernetwork_params"] > 0
    layers = aggregation_layers(build_model(load_config(run_config(tmp_path))), list(received[0][2]))
    replied = {cid: {k: v.numpy() for k, v in r.content["arrays"].items()} for cid, r in train_replies[:3]}
    # round 1's evaluations and round 2's trainings (one pipelined message per client)
    evaluated = {cid: a for kind, cid, a in received[3:9] if kind == "evaluate"}
    second = {cid: a for kind, cid, a in received[3:9] if kind == "train"}
    assert sorted(second) == sorted(evaluated) == [0, 1, 2]
    for cid in range(3):
        for key in second[cid]:  # evaluation after round 1 used the θ̄_i that round 2 trains on
            assert np.array_equal(second[cid][key], evaluated[cid][key]), key
        assert not np.allclose(second[cid]["head.weight"], replied[cid]["head.weight"])
        for keys in layers.values():  # each layer: a convex combination of the stored models
            b = np.concatenate([second[cid][k].ravel() for k in keys]).astype(np.float64)
            mat = np.stack([np.concatenate([replied[j][k].ravel() for k in keys]) for j in range(3)], 1)
            alpha, *_ = np.linalg.lstsq(mat.astype(np.float64), b, rcond=None)
            np.testing.assert_allclose(mat @ alpha, b, atol=1e-5)
            assert (alpha > -1e-3).all() and abs(alpha.sum() - 1) < 1e-3, alpha
    # what each client trained on in round 2 is what it received: its reply moved from θ̄_i
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["state"]["versions"] == [2, 2, 2] and state["state"]["trained"] == [0, 1, 2]
    names = sorted(p.name for p in (run_dir / STORE_DIR).iterdir())
    assert names == ["client-0.v2.npy", "client-1.v2.npy", "client-2.v2.npy", "initial.npy"]


def test_heurpfedla_with_every_layer_local_equals_local(tmp_path: Path, received, train_replies) -> None:
    """Every layer one-hot on self: what a client gets next (evaluated now, trained on next round)
    is exactly the model it returned."""
    fedhelpers.federate(run_config(tmp_path, "heurpfedla", rounds=1, extra="method.options.heur_k=99"))
    replied = {cid: {k: v.numpy() for k, v in r.content["arrays"].items()} for cid, r in train_replies}
    evaluated = {cid: a for kind, cid, a in received if kind == "evaluate"}
    assert sorted(evaluated) == sorted(replied) == [0, 1, 2]
    for cid in range(3):
        for key, value in evaluated[cid].items():
            assert np.array_equal(value, replied[cid][key]), key


# --------------------------------------------------------------------------- the benchmark


def test_memory_bench_runs_a_fresh_child_per_size_and_writes_json(tmp_path: Path, capsys) -> None:
    from fedvit.cli import main

    out = tmp_path / "bench.json"
    overrides = "model.depth=2 model.embed_dim=16 model.num_heads=2"
    argv = ["bench", "pfedla-memory", "--clients", "3", "--overrides", overrides, "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["clients"] == 3 and row["aggregation_layers"] == 4
    assert row["peak_rss_mb"] >= row["rss_setup_mb"] > 0 and row["round_s"] > 0
    assert row["store_bytes_on_disk"] >= 3 * 4 * row["model_params"]
