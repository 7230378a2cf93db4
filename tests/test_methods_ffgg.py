"""FFGG and Local FFGG (partially personalized FL) with robust aggregation of the shared part
and simulated attackers: the reduction to gradient descent, each aggregator by hand, the
private part out of the server's reach."""

from __future__ import annotations

from pathlib import Path

import fedhelpers
import numpy as np
import pytest
import torch
from fedhelpers import stored_private

from fedvit.config import ConfigError, load_config
from fedvit.robust import robust_aggregate
from strategies.ffgg import FFGGStrategy

TINY = (
    "model.depth=1 model.embed_dim=16 model.num_heads=2 data.max_train_per_client=60 "
    "train.batch_size=32 train.grad_clip=null"
)


def run_config(tmp_path: Path, method: str = "ffgg", rounds: int = 1, extra: str = "") -> dict:
    return fedhelpers.run_config(tmp_path, method, TINY, rounds, extra)


def checkpoint_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "checkpoint" / "arrays.npz") as z:
        return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------- FFGG = gradient descent


def full_gradient(cfg, client_id: int, model) -> dict[str, np.ndarray]:
    from fedvit.data import load_client_datasets

    data = load_client_datasets(cfg, client_id).train
    model.zero_grad()
    xs = torch.stack([data[i][0] for i in range(len(data))])
    ys = torch.tensor([data[i][1] for i in range(len(data))])
    torch.nn.functional.cross_entropy(model(xs), ys).backward()
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


def test_with_tau_zero_and_everything_shared_ffgg_is_distributed_gradient_descent(tmp_path: Path) -> None:
    from fedvit.models import build_model

    rc = run_config(
        tmp_path, extra="method.private=[] method.options.private_steps=0 method.options.server_lr=0.5"
    )
    _, results, run_dir = fedhelpers.federate(rc)
    assert results["status"] == "completed"
    cfg = load_config(rc)
    model = build_model(cfg)
    x0 = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    grads = [full_gradient(cfg, c, model) for c in range(3)]
    x1 = checkpoint_arrays(run_dir)
    assert set(x1) == set(x0)
    for k in grads[0]:
        expected = x0[k] - 0.5 * np.mean([g[k] for g in grads], axis=0)
        np.testing.assert_allclose(x1[k], expected, rtol=1e-4, atol=1e-6, err_msg=k)


def test_local_ffgg_with_server_lr_one_and_the_mean_is_the_mean_of_local_models(
    tmp_path: Path, train_replies
) -> None:
    from fedvit.models import build_model

    rc = run_config(tmp_path, "local-ffgg")
    _, _, run_dir = fedhelpers.federate(rc)
    x0 = build_model(load_config(rc)).state_dict()
    changes = [{k: v.numpy() for k, v in r.content["arrays"].items()} for _, r in train_replies]
    x1 = checkpoint_arrays(run_dir)
    for k in changes[0]:
        local_models = [x0[k].numpy() - c[k] for c in changes]
        np.testing.assert_allclose(x1[k], np.mean(local_models, axis=0), rtol=1e-5, atol=1e-6)
    assert not any(np.allclose(c["blocks.0.mlp.fc1.weight"], 0) for c in changes)


def test_the_private_part_never_reaches_the_server_and_aggregation_leaves_it_alone(
    tmp_path: Path, train_replies
) -> None:
    _, _, run_dir = fedhelpers.federate(run_config(tmp_path, rounds=1))
    after_round_1 = {c: stored_private(c, "ffgg") for c in range(3)}
    assert all(not {"head.weight", "norm.weight"} & set(r.content["arrays"].keys()) for _, r in train_replies)
    assert not {"head.weight", "norm.weight"} & set(checkpoint_arrays(run_dir))
    # The fine-tuned head is the client's: it moved during fine-tuning, and differs per client.
    assert not np.array_equal(after_round_1[0]["head.weight"], after_round_1[1]["head.weight"])


# --------------------------------------------------------------------------- aggregators by hand

UPDATES = [{"w": np.array([v, -v])} for v in (1.0, 2.5, 3.0, 3.5, 100.0)]  # the last is an outlier


@pytest.mark.parametrize(
    "rule, kwargs, expected",
    [
        ("mean", {}, [22.0, -22.0]),
        ("median", {}, [3.0, -3.0]),
        ("trimmed-mean", {"trim_fraction": 0.2}, [3.0, -3.0]),  # drops 1 and 100 per coordinate
        ("krum", {"num_byzantine": 1}, [3.0, -3.0]),  # least sq. distance to its n-f-2 nearest
        ("multi-krum", {"num_byzantine": 1, "multi_krum_keep": 3}, [3.0, -3.0]),  # mean of 2.5, 3, 3.5
    ],
)
def test_each_aggregator_matches_a_hand_computation(rule: str, kwargs: dict, expected: list[float]) -> None:
    out = robust_aggregate(rule, UPDATES, ["w"], **kwargs)
    np.testing.assert_allclose(out["w"], expected)


def test_bulyan_ignores_the_outlier_and_needs_4f_plus_3_updates() -> None:
    updates = [{"w": np.array([v])} for v in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1000.0)]
    out = robust_aggregate("bulyan", updates, ["w"], num_byzantine=1)
    assert 1.0 <= out["w"][0] <= 6.0
    with pytest.raises(ValueError, match="4f"):
        robust_aggregate("bulyan", updates[:6], ["w"], num_byzantine=1)


def test_robust_rules_resist_the_outlier_the_mean_follows() -> None:
    for rule in ("median", "trimmed-mean", "krum", "multi-krum"):
        out = robust_aggregate(rule, UPDATES, ["w"], num_byzantine=1, trim_fraction=0.2, multi_krum_keep=3)
        assert abs(out["w"][0]) < 5, rule


# --------------------------------------------------------------------------- attackers


def test_attackers_are_chosen_once_with_the_seed_and_only_they_are_told_to_attack(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord

    opts = FFGGStrategy.Options(attack="sign-flip", attack_fraction=0.2, attack_scale=3.0)
    s = FFGGStrategy(options=opts, shared_shapes={"w": (2,)}, num_clients=10, seed=0)
    again = FFGGStrategy(options=opts, shared_shapes={"w": (2,)}, num_clients=10, seed=0)
    assert len(s.attackers) == 2 and s.attackers == again.attackers and s.num_byzantine == 2
    for cid in range(10):
        config = s.client_config(1, cid, ConfigRecord())
        assert (config.get("attack") == "sign-flip") == (cid in s.attackers)


def test_a_sign_flip_attacker_sends_minus_scale_times_its_gradient(tmp_path: Path, train_replies) -> None:
    extra = (
        "method.options.attack=sign-flip method.options.attack_fraction=0.34 method.options.attack_scale=4.0"
    )
    honest_dir = tmp_path / "honest"
    fedhelpers.federate(run_config(honest_dir))
    honest = {cid: {k: v.numpy() for k, v in r.content["arrays"].items()} for cid, r in train_replies}
    train_replies.clear()
    _, results, _ = fedhelpers.federate(run_config(tmp_path / "attacked", extra=extra))
    (attacker,) = results["attackers"]
    attacked = {cid: {k: v.numpy() for k, v in r.content["arrays"].items()} for cid, r in train_replies}
    key = "blocks.0.attn.qkv.weight"
    np.testing.assert_allclose(attacked[attacker][key], -4.0 * honest[attacker][key], rtol=1e-4, atol=1e-7)
    other = next(c for c in attacked if c != attacker)
    np.testing.assert_allclose(attacked[other][key], honest[other][key], rtol=1e-4, atol=1e-7)


def test_bad_ffgg_options_fail_at_config_time() -> None:
    with pytest.raises(ConfigError, match=r"method\.options\.aggregator"):
        load_config({"method": "ffgg", "overrides": "method.options.aggregator=average"})
    with pytest.raises(ConfigError, match=r"method\.options\.attack"):
        load_config({"method": "ffgg", "overrides": "method.options.attack=poison"})
    with pytest.raises(ConfigError, match=r"method\.options\.private_unit"):
        load_config({"method": "ffgg", "overrides": "method.options.private_unit=minutes"})


# --------------------------------------------------------------------------- asynchronous


def async_config(tmp_path: Path, mode: str, rounds: int = 2) -> dict:
    extra = (
        "method.private=[head] method.options.concurrency=2 method.options.speed_tiers=[1.0,3.0] "
        f"method.options.mode={mode} method.options.buffer_size=2 method.options.staleness_exponent=0.5 "
        "method.options.updates_per_round=3 method.options.private_steps=1 method.options.grad_batches=1"
    )
    return run_config(tmp_path, "ffgg-async", rounds, extra)


def test_async_server_applies_each_update_with_the_staleness_weight_it_logs(
    tmp_path: Path, train_replies
) -> None:
    from fedvit.models import build_model

    rc = async_config(tmp_path, "immediate")
    _, results, run_dir = fedhelpers.federate(rc)
    assert results["status"] == "completed" and [r["round"] for r in results["rounds"]] == [1, 2]
    log = results["async_updates"]
    assert len(log) == 6 and [e["round"] for e in log] == [1, 1, 1, 2, 2, 2]
    for e in log:
        assert e["staleness"] == e["version_applied"] - e["version_sent"] >= 0
        assert e["weight"] == pytest.approx((1 + e["staleness"]) ** -0.5)
        assert e["version_after"] == e["version_applied"] + 1  # immediate: one server step each
    assert max(e["staleness"] for e in log) > 0  # the slow client's updates arrive stale
    # Client 1 is 3x slower (speed tiers [1, 3] in turn): fewer of its updates are applied.
    assert sum(e["client"] == 1 for e in log) < sum(e["client"] == 0 for e in log)
    # x_final = x0 - lr * sum_k w_k g_k, with each client's k-th reply matched to its k-th log entry.
    handled: dict[int, list] = {}
    for cid, reply in train_replies:
        handled.setdefault(cid, []).append({k: v.numpy() for k, v in reply.content["arrays"].items()})
    x = {k: v.numpy().astype(np.float64) for k, v in build_model(load_config(rc)).state_dict().items()}
    seen: dict[int, int] = {}
    for e in log:
        g = handled[e["client"]][seen.setdefault(e["client"], 0)]
        seen[e["client"]] += 1
        for k in g:
            x[k] -= 0.1 * e["weight"] * g[k]
    final = checkpoint_arrays(run_dir)
    for k, v in final.items():
        np.testing.assert_allclose(v, x[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_buffered_async_steps_once_per_full_buffer(tmp_path: Path) -> None:
    _, results, _ = fedhelpers.federate(async_config(tmp_path, "buffer"))
    log = results["async_updates"]
    assert [e.get("flushed", False) for e in log] == [False, True] * 3
    assert [e["version_after"] for e in log] == [0, 1, 1, 2, 2, 3]
