"""APFL and Per-FedAvg: their defining behaviour on toy models, their private state, their
options, and short in-process federations on digits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fedhelpers
import numpy as np
import pytest
import torch
from fedhelpers import stored_private
from torch import nn

from clients.apfl import ALPHA_KEY, V_PREFIX, AlphaMix, APFLClient, apfl_step, mix_parameters, pfllib_step
from clients.base import ClientSetup
from clients.perfedavg import (
    HVP,
    PerFedAvgClient,
    Variant,
    hessian_vector_product,
    meta_gradient,
    perfedavg_step,
)
from fedvit.config import ConfigError, load_config
from fedvit.inprocess import InProcessGrid
from fedvit.params import ParameterSplit, get_arrays
from fedvit.registry import method_options
from fedvit.server_app import run
from fedvit.state import PrivateStore

TINY = "model.depth=1 model.embed_dim=16 model.num_heads=2 data.max_train_per_client=60 train.batch_size=32"
CPU = torch.device("cpu")
CACHE: Path | None = None


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Micro models: one intra-op thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def _shared_partition_cache(tmp_path_factory):
    """One partition cache for the module (the same digits partition every time)."""
    global CACHE
    CACHE = tmp_path_factory.mktemp("partitions")


def linear(weight, bias) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return layer


def sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)


def ce_grad(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Closed-form gradient of the mean softmax cross-entropy of a linear layer."""
    p = torch.softmax(x @ weight.T + bias, dim=1)
    d = (p - nn.functional.one_hot(y, p.shape[1]).to(p.dtype)) / len(y)
    return d.T @ x, d.sum(0)


def two_linear_models() -> tuple[nn.Linear, nn.Linear, torch.Tensor, torch.Tensor]:
    """Seeded ``w`` and ``v`` (3 -> 2 linear layers) and a batch ``(x, y)`` of 5 for one APFL step."""
    torch.manual_seed(0)
    w, v = nn.Linear(3, 2), nn.Linear(3, 2)
    return w, v, torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])


def config(tmp_path: Path, method: str, extra: str = ""):
    return load_config({"method": method, "overrides": f"{TINY} data.cache_dir={CACHE} {extra}"})


def make_setup(cfg, store_dir: Path, client_id: int = 0) -> ClientSetup:
    from fedvit.data import load_client_datasets
    from fedvit.models import build_model

    model = build_model(cfg)
    split = ParameterSplit.from_model(model, cfg.method.private)
    data = load_client_datasets(cfg, client_id)
    return ClientSetup(cfg, client_id, model, split, data, PrivateStore(store_dir, fingerprint="t"), CPU)


def run_config(
    tmp_path: Path, method: str, rounds: int, extra: str = "", run_name: str | None = None
) -> dict:
    return fedhelpers.run_config(
        tmp_path, method, TINY, rounds, extra, CACHE, **{"run-name": run_name or method}
    )


def federate(tmp_path: Path, method: str, rounds: int, extra: str = "", run_name: str | None = None):
    _, results, run_dir = fedhelpers.federate(run_config(tmp_path, method, rounds, extra, run_name))
    return results, run_dir


# ----------------------------------------------------------------------------- APFL


def test_apfl_predicts_with_the_alpha_mix_of_the_two_models_logits() -> None:
    w = linear([[0.0, 0.0], [0.0, 0.0]], [1.0, 0.0])  # w(x) = [1, 0]
    v = linear([[0.0, 0.0], [0.0, 0.0]], [0.0, 2.0])  # v(x) = [0, 2]
    x = torch.tensor([[3.0, -1.0]])
    out = AlphaMix(w, v, 0.25)(x)
    assert out.tolist() == [[0.75, 0.5]]  # 0.25 * [0, 2] + 0.75 * [1, 0]
    assert torch.equal(AlphaMix(w, v, 0.0)(x), w(x))  # alpha = 0: FedAvg's prediction


def test_apfl_step_trains_w_on_its_own_loss_and_v_and_alpha_on_the_mixed_loss() -> None:
    w, v, x, y = two_linear_models()
    alpha, lr, alpha_lr = 0.3, 0.5, 0.2
    w0, wb0, v0, vb0 = (t.detach().clone() for t in (w.weight, w.bias, v.weight, v.bias))

    new_alpha, _, _ = apfl_step(w, v, alpha, x, y, sgd(w, lr), sgd(v, lr), adaptive=True, alpha_lr=alpha_lr)

    gw, gwb = ce_grad(w0, wb0, x, y)  # w: its own loss
    assert torch.allclose(w.weight, w0 - lr * gw, atol=1e-6)
    assert torch.allclose(w.bias, wb0 - lr * gwb, atol=1e-6)
    # v: the mixed logits z = alpha (v0 x + vb0) + (1 - alpha)(w0 x + wb0) are linear in v0 with
    # factor alpha, so dL/dv = alpha * (dL/dz)^T x and dL/dalpha = <dL/dz, v(x) - w(x)>.
    z_w, z_v = x @ w0.T + wb0, x @ v0.T + vb0
    mixed = alpha * z_v + (1 - alpha) * z_w
    p = torch.softmax(mixed, dim=1)
    dz = (p - nn.functional.one_hot(y, 2).float()) / len(y)
    assert torch.allclose(v.weight, v0 - lr * alpha * dz.T @ x, atol=1e-6)
    assert torch.allclose(v.bias, vb0 - lr * alpha * dz.sum(0), atol=1e-6)
    assert new_alpha == pytest.approx(alpha - alpha_lr * float((dz * (z_v - z_w)).sum()), abs=1e-6)


def _good_and_bad(confident: float = 3.0):
    """A model that predicts y = x[:, 0] > 0 well, and one that predicts the opposite."""
    good = linear([[-confident, 0.0], [confident, 0.0]], [0.0, 0.0])
    bad = linear([[confident, 0.0], [-confident, 0.0]], [0.0, 0.0])
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [2.0, 1.0], [-0.5, 0.0]])
    y = (x[:, 0] > 0).long()
    return good, bad, x, y


def _mixed_loss(w, v, alpha, x, y) -> float:
    return nn.functional.cross_entropy(AlphaMix(w, v, alpha)(x), y).item()


def test_adaptive_alpha_moves_to_lower_the_mixed_loss_and_stays_in_the_unit_interval() -> None:
    good, bad, x, y = _good_and_bad()

    def step(w, v, alpha, alpha_lr, adaptive=True):  # lr 0: the models stay, alpha alone is under test
        return apfl_step(w, v, alpha, x, y, sgd(w, 0.0), sgd(v, 0.0), adaptive=adaptive, alpha_lr=alpha_lr)[0]

    # private model good, shared bad: alpha grows, and the mixed loss falls
    up = step(bad, good, 0.5, 0.01)
    assert up > 0.5 and _mixed_loss(bad, good, up, x, y) < _mixed_loss(bad, good, 0.5, x, y)
    # private model bad, shared good: alpha shrinks
    down = step(good, bad, 0.5, 0.01)
    assert down < 0.5 and _mixed_loss(good, bad, down, x, y) < _mixed_loss(good, bad, 0.5, x, y)
    # huge steps are clipped to [0, 1]
    assert step(bad, good, 0.5, 1e6) == 1.0
    assert step(good, bad, 0.5, 1e6) == 0.0
    # a fixed alpha never moves
    assert step(bad, good, 0.5, 1e6, adaptive=False) == 0.5


def test_apfl_keeps_v_and_alpha_in_its_store_across_rounds(tmp_path: Path) -> None:
    cfg = config(tmp_path, "apfl", "train.local_steps=2 method.options.alpha_lr=0.5")
    first = APFLClient(make_setup(cfg, tmp_path / "state"))
    init = get_arrays(first.model, list(first.model.state_dict()))
    assert first.alpha == 0.25
    for k, a in get_arrays(first.private_model, list(init)).items():  # v_i starts as the initial model
        np.testing.assert_array_equal(a, init[k])
    sent, _, metrics = first.fit([init[k] for k in first.split.shared], {"server-round": 1})

    assert list(first.split.shared) == list(init)  # everything shared: w is the whole model ...
    assert len(sent) == len(init)  # ... and only w is sent
    stored = first.setup.store.load(first.private_state_shapes())
    assert set(stored) == {V_PREFIX + k for k in init} | {ALPHA_KEY}
    assert 0.0 <= stored[ALPHA_KEY][0] <= 1.0 and stored[ALPHA_KEY][0] != 0.25
    assert not any("alpha" in k for k in metrics)  # α_i stays home: only in the store
    changed = [k for k in init if not np.allclose(stored[V_PREFIX + k], init[k])]
    assert changed  # v_i trained
    sent_bytes = {a.tobytes() for a in sent}
    assert not any(stored[V_PREFIX + k].tobytes() in sent_bytes for k in changed)  # v_i is not sent

    second = APFLClient(make_setup(cfg, tmp_path / "state"))  # the next round: a fresh client object
    assert second.alpha == pytest.approx(stored[ALPHA_KEY][0])
    for k, a in get_arrays(second.private_model, list(init)).items():
        np.testing.assert_array_equal(a, stored[V_PREFIX + k])


def test_apfl_federation_sends_only_w_and_reports_the_mixed_model(tmp_path: Path, capture_replies) -> None:
    results, run_dir = federate(tmp_path, "apfl", rounds=2)
    assert results["status"] == "completed"
    cfg = load_config(run_config(tmp_path, "apfl", 2))
    from fedvit.data import load_client_datasets
    from fedvit.models import build_model
    from fedvit.params import set_arrays
    from fedvit.training import evaluate, make_loader

    keys = list(build_model(cfg).state_dict())
    for kind, cid, reply in capture_replies:
        arrays = reply.content.array_records
        if kind == "train":
            assert list(reply.content["arrays"].keys()) == keys  # w only: no apfl.* entry
            private = stored_private(cid, "apfl")
            sent = {v.numpy().tobytes() for v in reply.content["arrays"].values()}
            assert not any(private[V_PREFIX + k].tobytes() in sent for k in keys if "weight" in k)
        elif kind == "evaluate":
            assert not arrays
    with np.load(run_dir / "checkpoint" / "arrays.npz") as z:
        w_agg = {k: z[k] for k in z.files}
    last = results["rounds"][-1]["eval"]["per_client"]
    for cid in range(3):
        private = stored_private(cid, "apfl")
        w, v = build_model(cfg), build_model(cfg)
        set_arrays(w, w_agg)
        set_arrays(v, {k[len(V_PREFIX) :]: a for k, a in private.items() if k.startswith(V_PREFIX)})
        mix = AlphaMix(w, v, float(private[ALPHA_KEY][0]))
        res = evaluate(mix, make_loader(load_client_datasets(cfg, cid).test, 256, shuffle=False), CPU)
        assert res.accuracy == pytest.approx(last[str(cid)]["test-acc"])
        assert res.loss == pytest.approx(last[str(cid)]["test-loss"], rel=1e-5)


def test_apfl_resources_count_the_private_model_and_both_forwards() -> None:
    from fedvit.evaluation import resource_counts
    from fedvit.models import build_model

    model = build_model(load_config({"overrides": TINY}))
    split = ParameterSplit.from_model(model, [])
    base = resource_counts(model, split, (1, 16, 16))
    n = sum(t.numel() for t in model.state_dict().values())
    adjusted = APFLClient.adjust_resources(base, model, load_config({"method": "apfl"}))
    assert adjusted["params_private_per_client"] == n + 1  # v_i and alpha_i
    assert adjusted["params_stored_per_client"] == 2 * n + 1
    assert adjusted["params_sent_up_per_round"] == n  # w only
    assert adjusted["flops_per_sample"] == 2 * base["flops_per_sample"]
    pfllib = load_config({"method": "apfl", "overrides": "method.options.variant=pfllib"})
    assert APFLClient.adjust_resources(base, model, pfllib)["flops_per_sample"] == base["flops_per_sample"]


def test_apfl_with_alpha_zero_is_fedavg(tmp_path: Path) -> None:
    fixed_zero = "method.options.alpha=0 method.options.adaptive_alpha=false"
    apfl, _ = federate(tmp_path, "apfl", rounds=1, extra=fixed_zero)
    fedavg, _ = federate(tmp_path, "fedavg", rounds=1)
    ours, theirs = apfl["rounds"][0]["eval"]["per_client"], fedavg["rounds"][0]["eval"]["per_client"]
    if torch.cuda.is_available():  # the GPU's kernels differ from run to run in the last bits
        assert ours == pytest.approx(theirs, rel=1e-4)
    else:
        assert ours == theirs


# ------------------------------------------------------------- APFL as the FedPerfix authors ran it


def test_pfllib_step_trains_each_model_on_its_own_loss_and_moves_alpha_along_their_gap() -> None:
    w, v, x, y = two_linear_models()
    alpha, lr, alpha_lr = 0.3, 0.5, 0.2
    w0, wb0, v0, vb0 = (t.detach().clone() for t in (w.weight, w.bias, v.weight, v.bias))

    new_alpha, _, _ = pfllib_step(w, v, alpha, x, y, sgd(w, lr), sgd(v, lr), adaptive=True, alpha_lr=alpha_lr)

    gw, gwb = ce_grad(w0, wb0, x, y)
    gv, gvb = ce_grad(v0, vb0, x, y)  # v: its own loss, not the mixed one
    assert torch.allclose(w.weight, w0 - lr * gw, atol=1e-6) and torch.allclose(
        w.bias, wb0 - lr * gwb, atol=1e-6
    )
    assert torch.allclose(v.weight, v0 - lr * gv, atol=1e-6) and torch.allclose(
        v.bias, vb0 - lr * gvb, atol=1e-6
    )
    gap = ((v.weight - w.weight) * (alpha * gv + (1 - alpha) * gw)).sum() + (
        (v.bias - w.bias) * (alpha * gvb + (1 - alpha) * gwb)
    ).sum()  # parameters after the step, the step's gradients
    assert new_alpha == pytest.approx(alpha - alpha_lr * (float(gap) + 0.02 * alpha), abs=1e-6)


def test_the_parameter_mix_is_one_minus_alpha_w_plus_alpha_v() -> None:
    w = linear([[1.0, 2.0]], [4.0])
    v = linear([[3.0, -2.0]], [0.0])
    mix_parameters(w, v, 0.25)
    assert v.weight.tolist() == [[1.5, 1.0]] and v.bias.tolist() == [3.0]


def test_pfllib_apfl_keeps_the_mix_of_its_trained_models_and_evaluates_it_alone(tmp_path: Path) -> None:
    fixed = "train.local_steps=2 method.options.variant=pfllib method.options.adaptive_alpha=false"
    cfg = config(tmp_path, "apfl", f"{fixed} method.options.alpha=0")
    client = APFLClient(make_setup(cfg, tmp_path / "zero"))
    init = get_arrays(client.model, list(client.model.state_dict()))
    sent, _, _ = client.fit([init[k] for k in client.split.shared], {"server-round": 1})
    stored = client.setup.store.load(client.private_state_shapes())
    for k, a in zip(client.split.shared, sent, strict=True):  # α = 0: v is the trained w
        np.testing.assert_array_equal(stored[V_PREFIX + k], a)

    cfg = config(tmp_path, "apfl", f"{fixed} method.options.alpha=0.5")  # logit-mix would use w
    client = APFLClient(make_setup(cfg, tmp_path / "one"))
    client.fit([init[k] for k in client.split.shared], {"server-round": 1})
    evaluated = APFLClient(make_setup(cfg, tmp_path / "one"))  # the next message: v from the store
    zeros = [np.zeros_like(init[k]) for k in evaluated.split.shared]
    received = evaluated.evaluate(zeros, {"server-round": 1})  # a useless w changes nothing ...
    again = evaluated.evaluate([init[k] for k in evaluated.split.shared], {"server-round": 1})
    assert received == again  # ... the prediction is v's alone


def test_apfl_variants_are_named() -> None:
    with pytest.raises(ConfigError, match=r"method\.options\.variant"):
        load_config({"method": "apfl", "overrides": "method.options.variant=paper"})


# ----------------------------------------------------------------------------- Per-FedAvg


def test_perfedavg_fo_step_is_the_hand_computed_first_order_maml_update() -> None:
    torch.manual_seed(1)
    model = nn.Linear(3, 2)
    d1 = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    d2 = (torch.randn(4, 3), torch.tensor([1, 1, 0, 0]))
    alpha, beta = 0.3, 0.5
    W, b = model.weight.detach().clone(), model.bias.detach().clone()

    perfedavg_step(model, [d1, d2], sgd(model, beta), inner_lr=alpha, variant=Variant.fo)

    gW, gb = ce_grad(W, b, *d1)
    W1, b1 = W - alpha * gW, b - alpha * gb  # theta' = theta - alpha grad L_D(theta)
    hW, hb = ce_grad(W1, b1, *d2)  # g = grad L_D'(theta')
    assert torch.allclose(model.weight, W - beta * hW, atol=1e-6)
    assert torch.allclose(model.bias, b - beta * hb, atol=1e-6)


def _quadratic(params, batch):
    """L(theta) = 1/2 theta^T A theta - b^T theta: gradient A theta - b, Hessian A."""
    A, b = batch
    t = params["theta"]
    return 0.5 * t @ A @ t - b @ t


def _spd(seed: int):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(3, 3, generator=g, dtype=torch.float64)
    return m @ m.T + torch.eye(3, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("hvp", [HVP.autograd, HVP.finite_difference])
def test_perfedavg_hf_correction_matches_autograd_on_a_quadratic(hvp: HVP) -> None:
    (A1, b1), (A2, b2), (A3, b3) = _spd(1), _spd(2), _spd(3)
    theta = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    alpha = 0.05
    g, _ = meta_gradient(
        _quadratic,
        {"theta": theta},
        [(A1, b1), (A2, b2), (A3, b3)],
        inner_lr=alpha,
        variant=Variant.hf,
        hvp=hvp,
    )
    adapted = theta - alpha * (A1 @ theta - b1)
    outer = A2 @ adapted - b2
    expected = outer - alpha * A3 @ outer  # (I - alpha H_D'') grad L_D'(theta')
    assert torch.allclose(g["theta"], expected, atol=1e-6)
    # with D'' = D this is the exact MAML gradient of theta -> L_D'(theta - alpha grad L_D(theta))
    g_same, _ = meta_gradient(
        _quadratic,
        {"theta": theta},
        [(A1, b1), (A2, b2), (A1, b1)],
        inner_lr=alpha,
        variant=Variant.hf,
        hvp=hvp,
    )
    t = theta.clone().requires_grad_(True)
    (inner,) = torch.autograd.grad(_quadratic({"theta": t}, (A1, b1)), t, create_graph=True)
    (maml,) = torch.autograd.grad(_quadratic({"theta": t - alpha * inner}, (A2, b2)), t)
    assert torch.allclose(g_same["theta"], maml, atol=1e-6)


def test_finite_difference_hvp_agrees_with_autograd_on_the_micro_vit() -> None:
    """Both HF estimators on the real model (autograd needs attention's double backward)."""
    from clients.perfedavg import model_loss_fn
    from fedvit.models import build_model

    torch.manual_seed(2)
    vit = build_model(load_config({"overrides": TINY})).double()
    params = {k: p.detach() for k, p in vit.named_parameters()}
    u = {k: torch.randn_like(p) for k, p in params.items()}
    batch = (torch.randn(4, 1, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3]))
    loss = model_loss_fn(vit)
    exact = hessian_vector_product(loss, params, batch, u, method=HVP.autograd)
    approx = hessian_vector_product(loss, params, batch, u, method=HVP.finite_difference, delta=1e-5)
    for k in params:
        assert (approx[k] - exact[k]).abs().max() <= 1e-4 * exact[k].abs().max() + 1e-9, k


def test_perfedavg_evaluates_the_adapted_model_and_keeps_nothing(tmp_path: Path) -> None:
    # One batch holds the whole train split, so the adaptation steps are deterministic.
    cfg = config(tmp_path, "perfedavg", "train.batch_size=64 method.options.eval_adapt_steps=2")
    client = PerFedAvgClient(make_setup(cfg, tmp_path / "state"))
    received = [a.copy() for a in client.get_parameters({})]
    _, _, metrics = client.evaluate(received, {"server-round": 1})

    from fedvit.training import evaluate, make_loader

    model = make_setup(cfg, tmp_path / "other").model
    test_loader = make_loader(client.data.test, 256, shuffle=False)
    unadapted = evaluate(model, test_loader, CPU)
    (x, y), *_ = make_loader(client.data.train, 64, shuffle=False)
    assert len(y) == len(client.data.train)
    for _ in range(2):  # theta <- theta - alpha grad L_train(theta), by hand
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
    adapted = evaluate(model, test_loader, CPU)
    assert metrics["test-loss"] == pytest.approx(adapted.loss, rel=1e-5)
    assert metrics["test-acc"] == pytest.approx(adapted.accuracy)
    assert metrics["test-loss"] != pytest.approx(unadapted.loss, rel=1e-5)
    assert client.private_state() == {} and not client.setup.store.arrays_path.exists()  # nothing stored


# ----------------------------------------------------------------------------- config and federations


@pytest.mark.parametrize("method", ["apfl", "perfedavg", "perfedavg-hf"])
def test_method_yaml_loads(method: str) -> None:
    cfg = load_config({"method": method})
    assert cfg.method.private == []
    client_options, _ = method_options(cfg)
    assert client_options is not None


def test_option_defaults() -> None:
    assert method_options(load_config({"method": "apfl"}))[0] == APFLClient.Options(0.25, True, 0.01)
    fo = method_options(load_config({"method": "perfedavg"}))[0]
    assert fo == PerFedAvgClient.Options()
    assert (fo.variant, fo.inner_lr, fo.outer_lr, fo.eval_adapt_steps) == (Variant.fo, 0.01, None, 1)
    hf = method_options(load_config({"method": "perfedavg-hf"}))[0]
    assert (hf.variant, hf.hvp, hf.hf_delta) == (Variant.hf, HVP.finite_difference, 1e-3)


@pytest.mark.parametrize(
    ("method", "override", "needle"),
    [
        ("apfl", "method.options.alfa=0.5", "method.options.alfa"),  # typo
        ("apfl", "method.options.inner_lr=0.1", "method.options.inner_lr"),  # another method's option
        ("apfl", "method.options.alpha=1.5", "method.options.alpha"),
        ("apfl", "method.options.adaptive_alpha=maybe", "method.options.adaptive_alpha"),
        ("perfedavg", "method.options.variant=so", "method.options.variant"),
        ("perfedavg", "method.options.hf_delta=0", "method.options.hf_delta"),
        ("perfedavg", "method.options.eval_adapt_steps=-1", "method.options.eval_adapt_steps"),
        ("perfedavg", "method.options.beta=0.1", "method.options.beta"),
    ],
)
def test_bad_options_fail_at_config_time(method: str, override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config({"method": method, "overrides": override})


@pytest.mark.parametrize("method", ["perfedavg", "perfedavg-hf"])
def test_perfedavg_federation_completes_and_sends_only_the_meta_trained_model(
    tmp_path: Path, capture_replies, method: str
) -> None:
    results, _ = federate(tmp_path, method, rounds=1, extra="train.local_steps=2")
    assert results["status"] == "completed"
    assert sorted(results["rounds"][0]["eval"]["per_client"], key=int) == ["0", "1", "2"]
    kinds = [kind for kind, _, _ in capture_replies]
    assert kinds.count("train") == 3 and kinds.count("evaluate") == 3
    for kind, _, reply in capture_replies:
        if kind == "evaluate":
            assert not reply.content.array_records  # the adapted copy is never sent
        elif kind == "train":
            assert reply.content["metrics"]["num-steps"] == 2
    stored = [*Path(os.environ["FEDVIT_STATE_DIR"]).rglob("private.npz"), *tmp_path.rglob("private.npz")]
    assert not stored  # ... nor stored


def test_apfl_results_count_the_private_model_and_the_second_forward(tmp_path) -> None:
    from fedvit.config import load_config

    results = {}
    for method in ("fedavg", "apfl"):
        rc = {
            "method": method,
            "num-clients": 2,
            "num-server-rounds": 1,
            "output-dir": str(tmp_path),
            "run-name": method,
            "overrides": f"{TINY} output.plots=false data.cache_dir={tmp_path / 'c'}",
        }
        run_dir = run(InProcessGrid(rc, 2), load_config(rc))
        results[method] = json.loads((run_dir / "results.json").read_text())["resources"]
    fedavg, apfl = results["fedavg"], results["apfl"]
    assert apfl["params_private_per_client"] == fedavg["params_model"] + 1
    assert apfl["params_stored_per_client"] == 2 * fedavg["params_model"] + 1
    assert apfl["flops_per_sample"] == 2 * fedavg["flops_per_sample"]
    assert apfl["params_sent_up_per_round"] == fedavg["params_sent_up_per_round"]
