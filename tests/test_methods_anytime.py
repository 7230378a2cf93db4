"""Anytime / anywhere (adapters with early exits on a frozen ViT, device tiers): the model's
arithmetic, the tiers' wire, the server's per-parameter averages, per-exit evaluation and
``fedvit pretrain``."""

from __future__ import annotations

import json
from pathlib import Path

import fedhelpers
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from clients.anytime import AnytimeClient
from fedvit.cli import main as cli_main
from fedvit.config import ConfigError, load_config
from fedvit.inprocess import InProcessGrid
from fedvit.models import build_model
from fedvit.models.anytime import AnytimeViT
from fedvit.params import ParameterSplit, UpdateError, get_arrays, parameter_groups
from strategies.anytime import AnytimeStrategy
from strategies.base import ClientUpdate, to_numpy, to_record

TINY = (
    "model.depth=3 model.embed_dim=16 model.num_heads=2 model.anytime.width=8 "
    "data.max_train_per_client=60 train.batch_size=32 train.local_steps=2"
)


def anytime_cfg(extra: str = ""):
    return load_config({"method": "anytime", "overrides": f"{TINY} {extra}"})


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(3))


def block_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: seen.append(out)) for b in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


# --------------------------------------------------------------------------- the model


def test_at_zero_modulation_the_backbone_features_are_the_plain_vits_and_modulation_changes_them() -> None:
    plain = build_model(load_config({"method": "fedavg", "overrides": TINY})).eval()
    anytime = build_model(anytime_cfg()).eval()
    assert isinstance(anytime, AnytimeViT)
    plain_sd = plain.state_dict()
    assert all(torch.equal(anytime.state_dict()[k], v) for k, v in plain_sd.items())  # same backbone
    x = images()
    for got, want in zip(block_outputs(anytime, x), block_outputs(plain, x), strict=True):
        assert torch.equal(got, want)
    with torch.no_grad():
        torch.nn.init.normal_(anytime.adapters["1"].proj_out.weight, std=0.5)
    changed = block_outputs(anytime, x)
    ref = block_outputs(plain, x)
    assert torch.equal(changed[0], ref[0])  # block 1 runs before the first adapter
    assert not torch.allclose(changed[1][:, 0], ref[1][:, 0])


def test_groups_exits_and_the_depth_cap() -> None:
    model = build_model(anytime_cfg("model.anytime.exits=[1,3]"))
    groups = parameter_groups(model)
    assert {k.split(".")[1] for k in groups["adapter"]} == {"1", "3"}
    assert set(groups["backbone"]) == set(build_model(load_config({"overrides": TINY})).state_dict())
    assert not set(groups["backbone"]) & (set(groups["adapter"]) | set(groups["exit"]))
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in groups["backbone"])
    assert len(model.forward_exits(images())) == 2
    model.max_depth = 1
    assert len(model.forward_exits(images())) == 1


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"model\.anytime\.tiers"):
        anytime_cfg("model.anytime.exits=[1,3] model.anytime.tiers=[2]")
    with pytest.raises(ConfigError, match=r"model\.anytime\.exits"):
        anytime_cfg("model.anytime.exits=[4]")
    with pytest.raises(ConfigError, match=r"model\.anytime\.heads"):
        anytime_cfg("model.anytime.heads=3")
    with pytest.raises(ConfigError, match=r"'exit' needs model\.anytime\.enabled=true"):
        load_config({"method": "fedavg", "overrides": "method.private=[exit]"})
    with pytest.raises(ConfigError, match=r"method\.options\.finetune"):
        anytime_cfg("method.options.finetune=body")


# --------------------------------------------------------------------------- the server


def test_the_server_averages_each_parameter_over_the_clients_that_hold_it() -> None:
    shapes = {"adapters.1.w": (2,), "adapters.2.w": (2,), "adapters.3.w": (2,), "exit_head.fc.weight": (2,)}
    strategy = AnytimeStrategy(tiers=[1, 2], full_depth=3, shared_shapes=shapes, num_clients=2)
    assert strategy.held_keys(0) == ("adapters.1.w", "exit_head.fc.weight")
    current = to_record({k: np.full(2, 9.0, np.float32) for k in shapes})
    updates = [
        ClientUpdate(
            0,
            0,
            {"adapters.1.w": np.full(2, 1.0, np.float32), "exit_head.fc.weight": np.zeros(2, np.float32)},
            100,
        ),
        ClientUpdate(
            1,
            1,
            {k: np.full(2, 4.0, np.float32) for k in ("adapters.1.w", "adapters.2.w", "exit_head.fc.weight")},
            300,
        ),
    ]
    grid = InProcessGrid({}, 2, client_app=lambda msg, ctx: msg)
    strategy.node_to_client = {node: c for c, node in enumerate(sorted(grid.contexts))}
    _, plan = strategy.configure_train(1, current, ConfigRecord(), grid)
    assert set(plan.sent[0].shapes) == set(strategy.held_keys(0))  # a client is sent its tier only
    for u in updates:
        strategy.check_update(u, plan.sent[u.client_id])
    out = to_numpy(strategy.aggregate_shared(plan, updates))
    assert np.allclose(out["adapters.1.w"], 0.25 * 1 + 0.75 * 4)
    assert np.allclose(out["adapters.2.w"], 4.0)  # client 0 does not hold it: not diluted
    assert np.allclose(out["adapters.3.w"], 9.0)  # nobody holds it: unchanged
    extra = ClientUpdate(0, 0, {**updates[0].arrays, "adapters.2.w": np.zeros(2, np.float32)}, 100)
    with pytest.raises(UpdateError, match="unknown"):
        strategy.check_update(extra, plan.sent[0])  # a tier-1 client may not send adapter 2


def test_accuracy_at_a_compute_budget_is_the_deepest_affordable_exit_a_client_has() -> None:
    flops = {1: 1e6, 2: 2e6, 3: 3e6}
    tier2 = {"test-acc-exit1": 0.5, "test-acc-exit2": 0.7, "test-acc": 0.7}  # a tier-2 client
    by_exit = AnytimeStrategy(full_depth=3, shared_shapes={}, num_clients=1, exit_flops=flops)
    got = by_exit.client_eval_metrics(0, tier2, None)
    assert {k: v for k, v in got.items() if "budget" in k} == {
        "test-acc-budget-exit1": 0.5,
        "test-acc-budget-exit2": 0.7,
        "test-acc-budget-exit3": 0.7,  # it has no exit 3: its deepest exit answers within budget
    }
    options = AnytimeStrategy.Options(budgets_mflops=[0.5, 1.0, 2.5, 10])
    explicit = AnytimeStrategy(
        full_depth=3, shared_shapes={}, num_clients=1, exit_flops=flops, options=options
    )
    got = explicit.client_eval_metrics(0, tier2, None)
    assert [got[f"test-acc-budget-{b}M"] for b in ("0.5", "1", "2.5", "10")] == [0.0, 0.5, 0.7, 0.7]
    with pytest.raises(ConfigError, match="budgets_mflops"):
        anytime_cfg("method.options.budgets_mflops=[0]")


# --------------------------------------------------------------------------- in a federation


def test_tiers_send_exactly_their_adapters_the_backbone_never_moves_and_exits_are_reported(
    tmp_path: Path, train_replies, monkeypatch
) -> None:
    cfg = anytime_cfg("model.anytime.tiers=[1,2,3]")
    model = build_model(cfg)
    groups = parameter_groups(model)
    backbone = groups["backbone"]
    initial = get_arrays(model, backbone)
    seen: list[int] = []
    original = AnytimeClient.local_train

    def checked(self, server_round):
        before = get_arrays(self.model, backbone)
        result = original(self, server_round)
        after = get_arrays(self.model, backbone)
        assert all(
            np.array_equal(after[k], initial[k]) and np.array_equal(before[k], initial[k]) for k in backbone
        )
        seen.append(self.client_id)
        return result

    monkeypatch.setattr(AnytimeClient, "local_train", checked)
    extra = "model.anytime.tiers=[1,2,3] method.options.finetune_steps=1 method.options.distill_weight=0.5"
    rc = fedhelpers.run_config(tmp_path, "anytime", TINY, rounds=1, extra=extra)
    _, results, _ = fedhelpers.federate(rc)
    assert results["status"] == "completed" and sorted(seen) == [0, 1, 2]
    assert len(train_replies) == 3
    for cid, reply in train_replies:
        sent = set(reply.content["arrays"].keys())
        adapters = {k for k in groups["adapter"] if int(k.split(".")[1]) <= cid + 1}
        assert sent == adapters | set(groups["exit"])  # never the backbone, never the client token
    ev = results["rounds"][-1]["eval"]
    for cid in range(3):
        m = ev["per_client"][str(cid)]
        assert m["tier"] == cid + 1
        exits = sorted(int(k.removeprefix("test-acc-exit")) for k in m if k.startswith("test-acc-exit"))
        assert exits == list(range(1, cid + 2))
        assert m["test-acc"] == m[f"test-acc-exit{cid + 1}"]
    assert ev["test_acc_exit1"]["n"] == 3 and ev["test_acc_exit3"]["n"] == 1
    # every client answers within exit 3's budget, with its own deepest exit
    assert ev["test_acc_budget_exit3"]["n"] == 3
    assert all(
        ev["per_client"][str(c)]["test-acc-budget-exit3"] == ev["per_client"][str(c)]["test-acc"]
        for c in range(3)
    )
    res = results["resources"]
    assert res["flops_per_sample_exit1"] < res["flops_per_sample_exit2"] < res["flops_per_sample_exit3"]
    assert (
        res["params_sent_up_per_round_tier1"]
        < res["params_sent_up_per_round_tier3"]
        == res["params_sent_up_per_round"]
    )


def test_a_device_declares_its_tier_in_its_node_config_and_the_server_follows_it(
    tmp_path: Path, train_replies
) -> None:
    from fedvit.inprocess import InProcessGrid
    from fedvit.server_app import run

    rc = fedhelpers.run_config(tmp_path, "anytime", TINY, rounds=1, extra="model.anytime.tiers=[1,2,3]")
    # the config says tiers 1, 2, 3; devices 0 and 1 say otherwise; device 2 says nothing
    grid = InProcessGrid(rc, 3, node_configs=[{"max-depth": 3}, {"max-depth": "1"}, {}])
    results = json.loads((run(grid, load_config(rc)) / "results.json").read_text())
    assert results["status"] == "completed"
    adapters = parameter_groups(build_model(anytime_cfg()))["adapter"]
    depth_of = {
        cid: max(int(k.split(".")[1]) for k in r.content["arrays"] if k in adapters)
        for cid, r in train_replies
    }
    assert depth_of == {0: 3, 1: 1, 2: 3}
    assert {c: results["rounds"][-1]["eval"]["per_client"][str(c)]["tier"] for c in range(3)} == depth_of


@pytest.mark.parametrize("declared", [4, 0, 2, "deep", 2.5, True])
def test_a_node_config_tier_that_is_not_an_exit_depth_is_refused_by_name(declared) -> None:
    from types import SimpleNamespace

    from clients.anytime import device_tier

    cfg = anytime_cfg("model.anytime.exits=[1,3]")
    model = build_model(cfg)

    def setup(node_config):
        return SimpleNamespace(cfg=cfg, model=model, client_id=0, node_config=node_config)

    with pytest.raises(ValueError, match=r"max-depth=.*exit depths \[1, 3\]"):
        device_tier(setup({"max-depth": declared}))
    assert device_tier(setup({"max-depth": "3"})) == 3
    assert device_tier(setup({})) == 3  # no tiers configured: the full depth


def test_a_client_whose_tier_changed_since_it_identified_itself_refuses_the_message() -> None:
    client = AnytimeClient.__new__(AnytimeClient)
    client.tier, client.client_id = 2, 5
    client.check_tier({"tier": 2})
    with pytest.raises(ValueError, match="treats client 5 as tier 3, but it is tier 2"):
        client.check_tier({"tier": 3})


# --------------------------------------------------------------------------- pretrain


def test_pretrain_writes_a_file_that_model_pretrained_loads(tmp_path: Path, capsys) -> None:
    out = tmp_path / "backbone.pt"
    over = f"{TINY} data.cache_dir={tmp_path / 'cache'}"
    argv = ["pretrain", "-c", f"overrides='{over}'", "--out", str(out), "--max-examples", "200"]
    argv += ["--epochs", "2"]
    assert cli_main(argv) == 0 and out.is_file()
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # the summary alone on stdout; progress on stderr
    assert "epoch 1/2" in captured.err and "epoch 2/2" in captured.err
    assert summary["examples"] == 200 and 0 <= summary["test_acc"] <= 1
    saved = torch.load(out, weights_only=True)["model"]
    fresh = build_model(anytime_cfg()).state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in saved.items())  # it trained
    model = build_model(anytime_cfg(f"model.pretrained={out}"))
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in saved.items())
    split = ParameterSplit.from_model(model, load_config({"method": "anytime"}).method.private)
    assert set(saved) <= set(split.private)  # the pre-trained backbone is never sent
