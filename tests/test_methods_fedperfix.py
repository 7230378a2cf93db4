"""FedPerfix (local adapters generate K/V offsets) and vanilla prefix-tuning (learned K/V
prefix tokens): the block arithmetic, the parameter split, the resource counts, and a tiny
in-process federation."""

from __future__ import annotations

import copy
from pathlib import Path

import fedhelpers
import pytest
import torch
import torch.nn.functional as F
from fedhelpers import stored_private
from timm.models.vision_transformer import Block

from fedvit.config import ConfigError, load_config
from fedvit.evaluation import flops_per_sample, resource_counts
from fedvit.models import build_model
from fedvit.models import prefix as prefix_mod
from fedvit.models.prefix import KVAdapter, PrefixBlock, PrefixTokens
from fedvit.params import ParameterSplit, parameter_groups
from fedvit.report import collect

DIM, HEADS, TOKENS = 32, 4, 17
TINY = (
    "model.depth=2 model.embed_dim=16 model.num_heads=2 data.max_train_per_client=60 "
    "train.batch_size=32 train.local_epochs=1"
)


def plain_block() -> Block:
    torch.manual_seed(0)
    return Block(DIM, HEADS, mlp_ratio=2.0, qkv_bias=True).eval()


def with_plugin(block: Block, plugin) -> PrefixBlock:
    return PrefixBlock(copy.deepcopy(block), plugin).eval()


def x_in() -> torch.Tensor:
    return torch.randn(3, TOKENS, DIM, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- block arithmetic


@pytest.mark.parametrize("fused", [True, False])
def test_with_the_up_projection_at_zero_the_block_is_exactly_the_plain_vit_block(fused: bool) -> None:
    block = plain_block()
    adapter = KVAdapter(DIM, DIM, mid=8, scale=1.5)
    torch.nn.init.zeros_(adapter.up.weight)
    torch.nn.init.zeros_(adapter.up.bias)
    wrapped = with_plugin(block, adapter)
    for b in (block, wrapped):
        b.attn.fused_attn = fused
    with torch.no_grad():
        assert torch.equal(wrapped(x_in()), block(x_in()))


def capture_qkv(monkeypatch) -> list[tuple[torch.Tensor, ...]]:
    """Record the (q, k, v) every prefixed attention hands to scaled_dot_product_attention."""
    seen: list[tuple[torch.Tensor, ...]] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q, k, v))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(prefix_mod.F, "scaled_dot_product_attention", spy)
    return seen


def plain_qkv(block: Block, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    h = block.norm1(x)
    qkv = block.attn.qkv(h).reshape(x.shape[0], TOKENS, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
    return tuple(qkv.unbind(0))


def test_the_adapter_offsets_k_and_v_by_scale_times_its_output_of_the_block_input_and_never_q(
    monkeypatch,
) -> None:
    block = plain_block()
    wrapped = with_plugin(block, KVAdapter(DIM, DIM, mid=8, scale=1.5))
    seen = capture_qkv(monkeypatch)
    x = x_in()
    with torch.no_grad():
        wrapped(x)
        q0, k0, v0 = plain_qkv(block, x)
        ad = wrapped.kv_adapter
        offset = 1.5 * ad.up(torch.tanh(ad.down(block.norm1(x))))  # from norm1(x), as the authors do
        dk, dv = (t.reshape(3, TOKENS, HEADS, DIM // HEADS).transpose(1, 2) for t in offset.chunk(2, -1))
    ((q, k, v),) = seen
    assert torch.equal(q, q0)  # Q is never offset
    assert torch.allclose(k, k0 + dk, atol=1e-6) and torch.allclose(v, v0 + dv, atol=1e-6)
    assert not torch.allclose(k, k0)


def test_vanilla_prefixes_are_prepended_to_k_and_v_and_attended_by_every_query(monkeypatch) -> None:
    block = plain_block()
    tokens = PrefixTokens(DIM, length=5)
    wrapped = with_plugin(block, tokens)
    seen = capture_qkv(monkeypatch)
    x = x_in()
    with torch.no_grad():
        out = wrapped(x)
        q0, k0, v0 = plain_qkv(block, x)
    ((q, k, v),) = seen
    assert torch.equal(q, q0)
    assert k.shape == (3, HEADS, 5 + TOKENS, DIM // HEADS)
    pk = tokens.tokens[0].reshape(5, HEADS, DIM // HEADS).transpose(0, 1)
    assert torch.equal(k[:, :, :5], pk.expand(3, -1, -1, -1)) and torch.equal(k[:, :, 5:], k0)
    assert torch.equal(v[:, :, 5:], v0)
    # By hand: softmax(q k^T / sqrt(d)) v over the 5 + 17 keys, then proj, residual, MLP.
    attn = ((q0 @ k.transpose(-2, -1)) / (DIM // HEADS) ** 0.5).softmax(-1) @ v
    h = x + block.attn.proj(attn.transpose(1, 2).reshape(3, TOKENS, DIM))
    assert torch.allclose(out, h + block.mlp(block.norm2(h)), atol=1e-5)


def test_prefixes_go_on_the_last_depth_blocks_only() -> None:
    cfg = load_config({"method": "fedperfix", "overrides": "model.depth=4 model.prefix.depth=2"})
    model = build_model(cfg)
    assert [isinstance(b, PrefixBlock) for b in model.blocks] == [False, False, True, True]
    assert parameter_groups(model)["adapter"] == tuple(
        f"blocks.{i}.kv_adapter.{p}.{t}" for i in (2, 3) for p in ("down", "up") for t in ("weight", "bias")
    )


def test_the_backbone_starts_from_the_same_weights_as_fedavg() -> None:
    plain = build_model(load_config({"method": "fedavg"})).state_dict()
    perfix = build_model(load_config({"method": "fedperfix"})).state_dict()
    assert set(perfix) - set(plain) == set(
        parameter_groups(build_model(load_config({"method": "fedperfix"})))["adapter"]
    )
    assert all(torch.equal(plain[k], perfix[k]) for k in plain)


# --------------------------------------------------------------------------- the split


@pytest.mark.parametrize("method, plugin", [("fedperfix", "adapter"), ("vanilla-prefix", "prefix")])
def test_plugins_and_head_are_private_and_attention_is_shared(method: str, plugin: str) -> None:
    cfg = load_config({"method": method})
    model = build_model(cfg)
    groups = parameter_groups(model)
    split = ParameterSplit.from_model(model, cfg.method.private)
    assert set(split.private) == set(groups[plugin]) | set(groups["head"])
    assert set(groups["attn"]) <= set(split.shared)
    assert not set(groups[plugin]) & set(groups["attn"])  # plugins are not part of the attention group


def test_a_plugin_group_without_its_plugin_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"method.private.*'adapter' needs model.prefix.kind=fedperfix"):
        load_config({"method": "fedavg", "overrides": "method.private=[adapter,head]"})
    with pytest.raises(ConfigError, match=r"model\.prefix\.depth"):
        load_config({"method": "fedperfix", "overrides": "model.prefix.depth=9"})
    with pytest.raises(ConfigError, match=r"model\.prefix\.kind"):
        load_config({"method": "fedperfix", "overrides": "model.prefix.kind=lora"})


# --------------------------------------------------------------------------- resources by hand


def test_parameter_and_flop_counts_of_the_plugins_match_a_hand_count() -> None:
    over = "model.depth=3 model.embed_dim=48 model.num_heads=4 model.prefix.depth=2"
    plain = build_model(load_config({"method": "fedavg", "overrides": over}))
    perfix = build_model(load_config({"method": "fedperfix", "overrides": f"{over} model.prefix.mid=20"}))
    vanilla = build_model(
        load_config({"method": "vanilla-prefix", "overrides": f"{over} model.prefix.length=6"})
    )
    d, mid, length, blocks, n = 48, 20, 6, 2, (16 // 4) ** 2 + 1  # 16 px, patch 4, + class token

    def params(m):
        return sum(p.numel() for p in m.parameters())

    assert params(perfix) - params(plain) == blocks * (d * mid + mid + mid * 2 * d + 2 * d)
    assert params(vanilla) - params(plain) == blocks * 2 * length * d
    shape = (1, 16, 16)
    base = flops_per_sample(plain, shape)
    # Adapter: per token a (d x mid) and a (mid x 2d) matmul, 2 FLOPs per multiply-add.
    assert flops_per_sample(perfix, shape) - base == blocks * n * 2 * (d * mid + mid * 2 * d)
    # Prefix tokens: q @ k^T and attn @ v each gain n x length x d multiply-adds.
    assert flops_per_sample(vanilla, shape) - base == blocks * 2 * (2 * n * length * d)


def test_vit_small_fedperfix_stores_more_sends_less_and_computes_its_adapters() -> None:
    """The FedPerfix paper's setting (ViT-S/16 at 224 px, mid 256, scale 1.5, all 12 blocks)."""
    over = "data.num_classes=100"
    rows = {}
    for method in ("fedavg", "fedperfix"):
        cfg = load_config({"method": method, "model": "vit-small", "overrides": over})
        model = build_model(cfg)
        rows[method] = resource_counts(
            model, ParameterSplit.from_model(model, cfg.method.private), (1, 224, 224)
        )
    fa, fp = rows["fedavg"], rows["fedperfix"]
    adapters = 12 * (384 * 256 + 256 + 256 * 768 + 768)
    assert fp["params_stored_per_client"] == fa["params_stored_per_client"] + adapters
    assert fp["params_sent_up_per_round"] == fa["params_sent_up_per_round"] - 100 * 384 - 100 - 2 * 384
    assert fp["flops_per_sample"] - fa["flops_per_sample"] == 12 * 197 * 2 * (384 * 256 + 256 * 768)


# --------------------------------------------------------------------------- in a federation


def run_config(tmp_path: Path, method: str, rounds: int = 1) -> dict:
    return fedhelpers.run_config(tmp_path, method, TINY, rounds)


def test_fedperfix_clients_never_send_their_adapters_and_share_attention(
    tmp_path: Path, train_replies
) -> None:
    _, results, run_dir = fedhelpers.federate(run_config(tmp_path, "fedperfix", rounds=2))
    assert results["status"] == "completed"
    model = build_model(load_config(run_config(tmp_path, "fedperfix")))
    groups = parameter_groups(model)
    adapters, head = set(groups["adapter"]), set(groups["head"])
    assert len(train_replies) == 6
    for _cid, reply in train_replies:
        sent = set(reply.content["arrays"].keys())
        assert sent == set(model.state_dict()) - adapters - head
        assert set(groups["attn"]) <= sent
    private = {cid: stored_private(cid, "fedperfix") for cid in range(3)}
    for cid in range(3):
        assert set(private[cid]) == adapters | head
    # Each client trained its own adapters: they differ between clients.
    key = "blocks.0.kv_adapter.up.weight"
    assert not (private[0][key] == private[1][key]).all()

    # FedAvg on the same federation: the report's resource columns are Table 2's.
    fedhelpers.federate(run_config(tmp_path, "fedavg"))
    rows = {r["method"]: r for r in collect([run_dir, run_dir.parent / "fedavg"])}
    assert rows["fedperfix"]["storage_pct"] > 100
    assert rows["fedperfix"]["comm_pct"] < 100
    assert rows["fedperfix"]["compute_pct"] > 100
