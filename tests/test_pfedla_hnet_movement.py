"""scripts/pfedla_hnet_movement.py (issue 15): the decomposition ``final ≈ s·init + r`` of pFedLA's
hypernetworks, α at the start and at the checkpoint, and the gradient signal ``G_ij = <θ_j, Δ_i>``
at the checkpoint, checked on 2-round in-process runs on digits: a HeurpFedLA run that keeps every
layer local never steps its hypernetworks (s = 1, r = 0, α unchanged, no step moves α); a pFedLA
run with a large hypernetwork lr moves them (r > 0, α = the run's ``alpha.npz``), and the script's
G is the inner product computed here from the run's stored models."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType

import fedhelpers
import numpy as np
import pytest

from fedvit.config import load_config
from fedvit.layeragg import aggregation_layers
from fedvit.models import build_model
from fedvit.params import ParameterSplit
from strategies.pfedla import PFedLAStrategy
from strategies.pfedla_alpha import load_alpha

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TINY = (
    "model.depth=2 model.embed_dim=16 model.num_heads=2 data.max_train_per_client=40 "
    "train.batch_size=32 train.local_epochs=1 method.options.embed_dim=8 method.options.hidden=16 "
    "output.label_histograms=true"
)


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(SCRIPTS))  # the script imports its helper module from scripts/
    spec = importlib.util.spec_from_file_location("pfedla_hnet_movement", SCRIPTS / "pfedla_hnet_movement.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def federate(tmp_path: Path, method: str, extra: str) -> tuple[dict, Path]:
    rc = fedhelpers.run_config(tmp_path, method, TINY, 2, extra)
    _, results, run_dir = fedhelpers.federate(rc)
    assert results["status"] == "completed"
    return rc, run_dir


def files(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}


def _fit(final: np.ndarray, init: np.ndarray) -> tuple[float, float]:
    from hnet_fit import fit

    return fit(final, init)


def test_the_fit_of_a_scaled_tensor_has_no_residual_and_an_orthogonal_addition_is_all_residual(
    script: ModuleType,
) -> None:
    from hnet_fit import fit

    a = np.array([1.0, 2.0, 0.0])
    assert fit(0.9 * a, a) == pytest.approx((0.9, 0.0))
    s, r = fit(a + np.array([0.0, 0.0, 3.0]), a)  # + a part orthogonal to a
    assert s == pytest.approx(1.0) and r == pytest.approx(3.0 / np.sqrt(14.0))
    s, r = fit(np.array([0.5, 0.0]), np.zeros(2))  # a zero-initialized bias: all of it is r
    assert np.isnan(s) and r == pytest.approx(1.0)


def test_hypernetworks_that_never_stepped_have_s_1_r_0_and_the_same_alpha(
    tmp_path: Path, script: ModuleType
) -> None:
    # HeurpFedLA keeping all 4 layers (input, 2 blocks, output) local: no head is ever evaluated
    # with gradient, so the strategy never steps a hypernetwork
    _, run_dir = federate(tmp_path, "heurpfedla", "method.options.heur_k=4 method.options.hn_lr=0.5")
    m = script.measure(run_dir, tmp_path / "work")
    assert m.round == 2 and m.layers == ["input", "blocks.0", "blocks.1", "output"]
    for init, final in zip(m.init_hnets, m.final_hnets, strict=True):
        assert set(init) == set(final)
        for k in init:
            if np.linalg.norm(init[k]) > 0:
                s, r = _fit(final[k], init[k])
                assert (s, r) == (1.0, 0.0), k
            else:
                assert not final[k].any(), k
    np.testing.assert_array_equal(m.alpha_final, m.alpha_init)
    assert not m.one_step.any()


def test_a_large_hypernetwork_lr_moves_the_heads_and_alpha_and_g_is_the_stored_models_inner_product(
    tmp_path: Path, script: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, run_dir = federate(tmp_path, "pfedla", "method.options.hn_lr=100")
    before = files(run_dir)
    m = script.measure(run_dir, tmp_path / "work")
    assert files(run_dir) == before  # nothing written into the run

    # the initialization is the seeded one a fresh strategy of this config builds ...
    cfg = load_config(rc)
    model = build_model(cfg)
    split = ParameterSplit.from_model(model, cfg.method.private)
    fresh = PFedLAStrategy.from_config(
        cfg, model=model, split=split, recorder=None, run_dir=tmp_path / "fresh", run_name="t"
    )
    for i, hn in enumerate(fresh.agg.hnets):
        for k, v in hn.state_dict().items():
            np.testing.assert_array_equal(m.init_hnets[i][k], v.numpy())
    # ... the final state is the checkpoint's, and α is the run's alpha.npz
    with np.load(run_dir / "checkpoint" / "strategy.npz") as z:
        for i in range(3):
            for k in m.final_hnets[i]:
                np.testing.assert_array_equal(m.final_hnets[i][k], z[f"hn.{i}.{k}"])
    np.testing.assert_array_equal(m.alpha_final, load_alpha(run_dir).alpha)
    heads = [
        _fit(m.final_hnets[i][k], m.init_hnets[i][k])[1]
        for i in range(3)
        for k in m.init_hnets[i]
        if k.startswith("heads.") and k.endswith("weight")
    ]
    assert min(heads) > 5e-5  # every head moved (float32 rounding alone: ~1e-7; untouched: 0)
    assert np.abs(m.alpha_final - m.alpha_init).max() > 1e-6

    # G_ij = <θ_j^l, θ̄_i^l − θ_i^l> from the stored models (round 2) and the checkpoint's α
    layers = aggregation_layers(model, split.shared)
    sizes = {k: v.numel() for k, v in model.state_dict().items()}
    cuts = np.cumsum([0] + [sum(sizes[k] for k in ks) for ks in layers.values()])
    thetas = [np.load(run_dir / "model-store" / f"client-{j}.v2.npy").astype(np.float64) for j in range(3)]
    spans = list(itertools.pairwise(cuts))
    for i in range(3):
        bar = np.concatenate(
            [
                sum(m.alpha_final[i, layer, j] * thetas[j][a:b] for j in range(3))
                for layer, (a, b) in enumerate(spans)
            ]
        )
        delta = bar.astype(np.float32).astype(np.float64) - thetas[i]  # θ̄_i travels as float32
        expected = [[thetas[j][a:b] @ delta[a:b] for j in range(3)] for a, b in spans]
        np.testing.assert_allclose(m.gradient[i], expected, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(m.delta_norm[i], [np.linalg.norm(delta[a:b]) for a, b in spans], rtol=1e-6)
    assert (m.one_step > 0).all()  # lr 100: one step along G moves every layer's α

    assert script.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "round 2, 3 clients" in out
    for label in ("client embeddings", "MLP weights", "heads' weights", "heads' biases", "one step moves α"):
        assert label in out
    assert files(run_dir) == before
