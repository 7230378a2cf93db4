"""The pFL baselines on the parameter split: FedBN, Vanilla Attention, FedRep, FedBABU,
FedSim and FedAlt. Each test states one defining behaviour, checked on toy arrays or in a
tiny in-process federation (3 clients, a one-block ViT, 60 training examples per client)."""

from __future__ import annotations

from pathlib import Path

import fedhelpers
import numpy as np
import pytest
import torch
from fedhelpers import stored_private

from fedvit.config import ConfigError, load_config
from fedvit.params import UpdateError, parameter_groups
from strategies.base import ClientUpdate, RoundFailedError, RoundPlan, Sent, to_numpy, to_record
from strategies.server_opt import ServerOptStrategy

TINY = (
    "model.depth=1 model.embed_dim=16 model.num_heads=2 data.max_train_per_client=60 "
    "train.batch_size=32 train.local_epochs=1"
)
HEAD = {"head.weight", "head.bias", "norm.weight", "norm.bias"}  # the `head` group
CLASSIFIER = {"head.weight", "head.bias"}  # the `classifier` group (FedBABU)


def run_config(tmp_path: Path, method: str, rounds: int = 1, extra: str = "") -> dict:
    return fedhelpers.run_config(tmp_path, method, TINY, rounds, extra)


def federate(tmp_path: Path, method: str, rounds: int = 1, extra: str = "") -> tuple[dict, Path]:
    _, results, run_dir = fedhelpers.federate(run_config(tmp_path, method, rounds, extra))
    return results, run_dir


def initial_state(tmp_path: Path, method: str) -> dict[str, torch.Tensor]:
    from fedvit.models import build_model

    return build_model(load_config(run_config(tmp_path, method))).state_dict()


@pytest.fixture
def phases(monkeypatch):
    """``phases(module)`` records each ``train_local`` call made through ``module``: the
    state-dict keys that call changed, and the model's state before it."""

    def install(module) -> list[dict]:
        calls: list[dict] = []
        real = module.train_local

        def spy(model, *args, **kwargs):
            before = {k: v.detach().clone() for k, v in model.state_dict().items()}
            result = real(model, *args, **kwargs)
            after = model.state_dict()
            # .cpu(): a client on a GPU moves the model there inside train_local.
            changed = {k for k in before if not torch.equal(before[k].cpu(), after[k].cpu())}
            calls.append({"changed": changed, "before": before})
            return result

        monkeypatch.setattr(module, "train_local", spy)
        return calls

    return install


# --------------------------------------------------------------------------- every method

NEVER_SENT = {
    "fedbn": {"blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.norm2.weight", "norm.weight"},
    "vanilla-attention": {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", *HEAD},
    "fedrep": HEAD,
    "fedbabu": CLASSIFIER,
    "fedsim": HEAD,
    "fedalt": HEAD,
}


@pytest.mark.parametrize("method", sorted(NEVER_SENT))
def test_method_loads_runs_and_sends_only_its_shared_split(
    tmp_path: Path, method: str, train_replies
) -> None:
    cfg = load_config({"method": method})
    assert cfg.method.name == method
    results, _ = federate(tmp_path, method)
    assert results["status"] == "completed"
    assert sorted(results["rounds"][-1]["eval"]["per_client"], key=int) == ["0", "1", "2"]

    state = initial_state(tmp_path, method)
    groups = parameter_groups_of(tmp_path, method)
    private = set().union(*(groups[g] for g in load_config(run_config(tmp_path, method)).method.private))
    assert NEVER_SENT[method] <= private
    assert len(train_replies) == 3
    for cid, reply in train_replies:
        sent = set(reply.content["arrays"].keys())
        assert sent == set(state) - private  # exactly the shared split
        assert not sent & NEVER_SENT[method]
        assert set(stored_private(cid, method)) == private  # kept at home instead


def parameter_groups_of(tmp_path: Path, method: str) -> dict[str, tuple[str, ...]]:
    from fedvit.models import build_model

    return parameter_groups(build_model(load_config(run_config(tmp_path, method))))


def test_fedbn_keeps_every_layernorm_and_vanilla_attention_the_attention_private(tmp_path: Path) -> None:
    groups = parameter_groups_of(tmp_path, "fedbn")
    layernorms = {k for k in groups["all"] if "norm" in k}
    assert set(load_config({"method": "fedbn"}).method.private) == {"norm"}
    assert set(groups["norm"]) == layernorms
    va = load_config({"method": "vanilla-attention"}).method.private
    assert set(va) == {"attn", "head"}
    assert {k for k in groups["all"] if ".attn." in k} <= set(groups["attn"])


# --------------------------------------------------------------------------- FedRep / FedAlt / FedSim


def test_fedrep_trains_the_head_with_the_body_frozen_then_the_body_with_the_head_frozen(
    tmp_path: Path, phases, train_replies
) -> None:
    import clients.fedrep

    calls = phases(clients.fedrep)
    federate(tmp_path, "fedrep", extra="method.options.head_epochs=1")
    assert len(calls) == 6  # 3 clients x (head phase, body phase)
    for head_phase, body_phase in zip(calls[::2], calls[1::2], strict=True):
        assert "head.weight" in head_phase["changed"] and head_phase["changed"] <= HEAD
        assert body_phase["changed"] and not body_phase["changed"] & HEAD
    for _, reply in train_replies:
        assert not set(reply.content["arrays"].keys()) & HEAD


def test_fedalt_freezes_the_shared_part_in_the_private_phase_and_vice_versa(tmp_path: Path, phases) -> None:
    import clients.fedrep  # FedAlt's client alternates with FedRep's machinery

    calls = phases(clients.fedrep)
    federate(tmp_path, "fedalt", extra="method.private=[head,patch_embed]")  # any split is a config value
    private = HEAD | {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert len(calls) == 6
    for private_phase, shared_phase in zip(calls[::2], calls[1::2], strict=True):
        assert "patch_embed.proj.weight" in private_phase["changed"] and private_phase["changed"] <= private
        assert shared_phase["changed"] and not shared_phase["changed"] & private


def test_fedsim_trains_both_parts_and_the_server_takes_the_batch_weighted_mean(
    tmp_path: Path, phases, train_replies
) -> None:
    import clients.base

    calls = phases(clients.base)
    _, run_dir = federate(tmp_path, "fedsim", extra="data.partition.alpha=0.3")
    assert len(calls) == 3
    for call in calls:  # one phase in which private and shared parameters both move
        assert "head.weight" in call["changed"] and "blocks.0.attn.qkv.weight" in call["changed"]
    with np.load(run_dir / "checkpoint" / "arrays.npz") as z:
        new = {k: z[k] for k in z.files}
    steps = np.array([reply.content["metrics"]["num-steps"] for _, reply in train_replies], dtype=float)
    for k, v in new.items():  # server_lr = 1, sgd: FedAvg weighted by local batches
        mean = sum(
            s * reply.content["arrays"][k].numpy() for s, (_, reply) in zip(steps, train_replies, strict=True)
        )
        np.testing.assert_allclose(v, mean / steps.sum(), rtol=1e-5, atol=1e-6)


def test_alternating_clients_refuse_an_empty_part(tmp_path: Path) -> None:
    with pytest.raises(RoundFailedError, match="both must be non-empty"):  # every client fails: the run stops
        federate(tmp_path, "fedrep", extra="method.private=[]")


# --------------------------------------------------------------------------- FedBABU


def test_fedbabu_keeps_the_head_at_its_init_and_fine_tunes_a_copy_only_for_evaluation(
    tmp_path: Path, phases, monkeypatch
) -> None:
    import clients.base
    import clients.fedbabu

    calls = phases(clients.fedbabu)
    evaluated_heads = []
    real_evaluate = clients.base.evaluate

    def spy_evaluate(model, loader, device):
        evaluated_heads.append(model.state_dict()["head.weight"].clone())
        return real_evaluate(model, loader, device)

    monkeypatch.setattr(clients.base, "evaluate", spy_evaluate)
    results, _ = federate(tmp_path, "fedbabu", rounds=2)
    init = initial_state(tmp_path, "fedbabu")

    for cid in range(3):  # after FL rounds every client's head is still the (shared) init
        for k, v in stored_private(cid, "fedbabu").items():
            np.testing.assert_array_equal(v, init[k].numpy())
    training = [c for c in calls if not c["changed"] & CLASSIFIER]
    finetuning = [c for c in calls if c["changed"] & CLASSIFIER]
    assert len(training) == len(finetuning) == 6  # 2 rounds x 3 clients each
    assert all(c["changed"] <= CLASSIFIER for c in finetuning)  # fine-tuning trains the head only
    assert all("norm.weight" in c["changed"] for c in training)  # the pre-head norm is body
    for c in calls:  # training and fine-tuning both start from the init head, never a fine-tuned one
        assert torch.equal(c["before"]["head.weight"], init["head.weight"])
    assert len(evaluated_heads) == 12  # test + val per client and round
    assert not any(torch.equal(h, init["head.weight"]) for h in evaluated_heads)  # fine-tuned
    assert results["summary"]["last_round"]["test_acc"]["mean"] >= 0


def test_fedbabu_without_fine_tuning_evaluates_the_init_head(tmp_path: Path, phases) -> None:
    import clients.fedbabu

    calls = phases(clients.fedbabu)
    federate(tmp_path, "fedbabu", extra="method.options.finetune_epochs=0")
    assert len(calls) == 3 and not any(c["changed"] & CLASSIFIER for c in calls)


def test_fedbabu_as_the_fedperfix_authors_ran_it_fine_tunes_the_whole_model_for_one_step(
    tmp_path: Path, phases
) -> None:
    import clients.fedbabu

    calls = phases(clients.fedbabu)
    federate(
        tmp_path, "fedbabu", rounds=2, extra="method.options.finetune_steps=1 method.options.finetune=all"
    )
    init = initial_state(tmp_path, "fedbabu")
    finetuning = [c for c in calls if c["changed"] & CLASSIFIER]
    assert len(finetuning) == 6  # 2 rounds x 3 clients
    assert all("blocks.0.attn.qkv.weight" in c["changed"] for c in finetuning)  # the body too
    for c in calls:  # every training and fine-tuning starts from the init head, never a tuned one
        assert torch.equal(c["before"]["head.weight"], init["head.weight"])
    for cid in range(3):
        for k, v in stored_private(cid, "fedbabu").items():
            np.testing.assert_array_equal(v, init[k].numpy())


def test_fedbabu_fine_tunes_only_the_head_or_everything() -> None:
    with pytest.raises(ConfigError, match=r"method\.options\.finetune"):
        load_config({"method": "fedbabu", "overrides": "method.options.finetune=body"})


# --------------------------------------------------------------------------- server optimizer

X0 = {"w": np.array([1.0, 1.0], dtype=np.float32), "b": np.array([0.5], dtype=np.float32)}
CLIENTS = [  # (shared arrays after local training, local batches, examples)
    ({"w": np.array([1.0, 2.0], np.float32), "b": np.array([1.0], np.float32)}, 1, 100),
    ({"w": np.array([3.0, 4.0], np.float32), "b": np.array([2.0], np.float32)}, 1, 1),
    ({"w": np.array([5.0, -6.0], np.float32), "b": np.array([0.0], np.float32)}, 2, 1),
]
# batch-weighted mean (weights 1/4, 1/4, 1/2): w = [14/4, -6/4], b = 3/4


def server(tmp_path: Path | None = None, **options) -> ServerOptStrategy:
    return ServerOptStrategy(
        shared_shapes={"w": (2,), "b": (1,)},
        num_clients=3,
        options=ServerOptStrategy.Options(**options),
        checkpoint_dir=tmp_path / "checkpoint" if tmp_path is not None else None,
    )


def updates(clients=CLIENTS) -> list[ClientUpdate]:
    return [
        ClientUpdate(cid, 100 + cid, arrays, examples, {"num-steps": steps})
        for cid, (arrays, steps, examples) in enumerate(clients)
    ]


def plan(x: dict[str, np.ndarray], rnd: int = 1) -> RoundPlan:
    """A training round that started from ``x`` (what the server optimizer steps from)."""
    return RoundPlan("train", rnd, to_record(x), {}, 0)


def step(strategy: ServerOptStrategy, x: dict[str, np.ndarray], rnd: int = 1) -> dict[str, np.ndarray]:
    return to_numpy(strategy.aggregate_shared(plan(x, rnd), updates()))


def test_sgd_with_server_lr_1_is_fedavg_weighted_by_local_batches() -> None:
    new = step(server(server_opt="sgd", server_lr=1.0), X0)
    np.testing.assert_allclose(new["w"], [3.5, -1.5])
    np.testing.assert_allclose(new["b"], [0.75])
    assert new["w"].dtype == np.float32


def test_sgd_with_server_lr_half_moves_half_way() -> None:
    new = step(server(server_lr=0.5), X0)
    np.testing.assert_allclose(new["w"], [1 + 0.5 * 2.5, 1 - 0.5 * 2.5])
    np.testing.assert_allclose(new["b"], [0.5 + 0.5 * 0.25])


def test_clients_are_weighted_by_local_batches_not_examples() -> None:
    a = {"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}
    b = {"w": np.full(2, 4.0, np.float32), "b": np.full(1, 4.0, np.float32)}
    for examples in ((1, 1000), (1000, 1)):
        ups = [
            ClientUpdate(0, 1, a, examples[0], {"num-steps": 3}),
            ClientUpdate(1, 2, b, examples[1], {"num-steps": 1}),
        ]
        new = to_numpy(server().aggregate_shared(plan(a), ups))
        np.testing.assert_allclose(new["w"], [1.0, 1.0])  # 3/4 * 0 + 1/4 * 4


def test_sgd_server_momentum_accumulates_the_pseudo_gradient() -> None:
    s = server(server_lr=0.5, server_momentum=0.9)
    x1 = step(s, X0)  # m = Δ1 = [2.5, -2.5]
    np.testing.assert_allclose(x1["w"], [2.25, -0.25])
    x2 = step(s, x1, 2)  # Δ2 = [3.5, -1.5] - x1 = [1.25, -1.25]; m = 0.9 * Δ1 + Δ2 = [3.5, -3.5]
    np.testing.assert_allclose(x2["w"], [2.25 + 1.75, -0.25 - 1.75], rtol=1e-6)


def test_adam_first_step_moves_each_coordinate_by_server_lr_along_the_mean_change() -> None:
    new = step(server(server_opt="adam", server_lr=0.01), X0)
    np.testing.assert_allclose(new["w"], [1.01, 0.99], rtol=1e-6)  # bias-corrected: lr * sign(Δ)
    np.testing.assert_allclose(new["b"], [0.51], rtol=1e-6)


def test_adam_state_survives_a_checkpoint_round_trip(tmp_path: Path) -> None:
    a = server(tmp_path, server_opt="adam", server_lr=0.1)
    x = step(a, step(a, X0, 1), 2)
    a.save_checkpoint(2, to_record(x))

    b = server(tmp_path, server_opt="adam", server_lr=0.1)
    rnd, arrays = b.load_checkpoint(tmp_path / "checkpoint")
    assert rnd == 2 and b.step == 2
    for name in ("exp_avg", "exp_avg_sq"):
        for k in X0:
            np.testing.assert_array_equal(b.moments[name][k], a.moments[name][k])
    np.testing.assert_array_equal(step(b, to_numpy(arrays), 3)["w"], step(a, x, 3)["w"])

    fresh = step(server(server_opt="adam", server_lr=0.1), x)  # without the state: a different step
    assert not np.allclose(fresh["w"], step(b, to_numpy(arrays), 3)["w"])


def test_resuming_with_another_server_optimizer_is_refused(tmp_path: Path) -> None:
    a = server(tmp_path, server_opt="adam")
    a.save_checkpoint(1, to_record(step(a, X0)))
    with pytest.raises(ValueError, match="server optimizer is 'adam'"):
        server(tmp_path, server_opt="sgd").load_checkpoint(tmp_path / "checkpoint")


def test_an_update_without_local_batches_is_rejected() -> None:
    s, sent = server(), Sent(0, 1, {k: v.shape for k, v in X0.items()})
    s.check_update(ClientUpdate(0, 1, dict(X0), 10, {"num-steps": 1}), sent)
    with pytest.raises(UpdateError, match="num-steps"):
        s.check_update(ClientUpdate(0, 1, dict(X0), 10, {}), sent)
    with pytest.raises(UpdateError, match="num-steps"):
        s.check_update(ClientUpdate(0, 1, dict(X0), 10, {"num-steps": 0}), sent)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ("method.options.server_opt=rmsprop", "server_opt"),
        ("method.options.server_lr=0", "server_lr"),
        ("method.options.server_momentum=1.5", "server_momentum"),
        ("method.options.private_epochs=-1", "private_epochs"),
    ],
)
def test_bad_server_and_phase_options_fail_at_config_time(options: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"method\.options\.{key}"):
        load_config({"method": "fedalt", "overrides": options})
