"""pFedLA's learned α on disk and as a picture (issue 15): ``alpha.npz`` after a run is exactly
what the strategy's hypernetworks give (checked against a strategy restored from the run's
checkpoint), HeurpFedLA's "used" α is one-hot on self in its kept-local layers, the heatmap grid
is written (by the run and by ``fedvit alpha``), and the label-overlap correlation tells a
label-structured α from a uniform one."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import fedhelpers
import numpy as np
import pytest
import torch
from matplotlib.image import imread

from fedvit.cli import main
from fedvit.config import load_config
from fedvit.models import build_model
from fedvit.params import ParameterSplit
from strategies.pfedla import PFedLAStrategy
from strategies.pfedla_alpha import (
    ALPHA_FILE,
    ALPHA_PLOT,
    AlphaMatrix,
    label_correlation,
    label_order,
    label_overlap,
    load_alpha,
    plot_alpha,
    save_alpha,
)

TINY = (
    "model.depth=2 model.embed_dim=16 model.num_heads=2 data.max_train_per_client=40 "
    "train.batch_size=32 train.local_epochs=1 method.options.embed_dim=8 method.options.hidden=16"
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_config(tmp_path: Path, method: str = "pfedla", rounds: int = 2, extra: str = "") -> dict:
    return fedhelpers.run_config(tmp_path, method, TINY, rounds, extra)


def strategy(rc: dict, run_dir: Path) -> PFedLAStrategy:
    cfg = load_config(rc)
    model = build_model(cfg)
    split = ParameterSplit.from_model(model, cfg.method.private)
    return PFedLAStrategy.from_config(
        cfg, model=model, split=split, recorder=None, run_dir=run_dir, run_name="t"
    )


def test_the_saved_alpha_is_the_strategys_after_the_last_round_and_its_plot_is_written(
    tmp_path: Path,
) -> None:
    # label histograms (off by default since issue 18) give the plot its label-overlap panel
    rc = run_config(tmp_path, extra="method.options.hn_lr=0.5 output.plots=true output.label_histograms=true")
    _, results, run_dir = fedhelpers.federate(rc)
    assert results["status"] == "completed"
    saved = load_alpha(run_dir)
    assert (saved.round, saved.trained, saved.heur_k) == (2, [0, 1, 2], 0)
    assert saved.layers == ["input", "blocks.0", "blocks.1", "output"]
    assert saved.alpha.shape == (3, 4, 3)
    np.testing.assert_allclose(saved.alpha.sum(axis=2), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(saved.alpha_used, saved.alpha)  # pFedLA: nothing kept local

    # The same numbers from the checkpoint's hypernetworks, in a strategy built afresh (on the
    # run's own model store, which the checkpoint refers to).
    restored = strategy(rc, run_dir)
    assert restored.load_checkpoint(run_dir / "checkpoint")[0] == 2
    again = restored.alpha_matrix(2)
    np.testing.assert_array_equal(again.alpha, saved.alpha)
    np.testing.assert_array_equal(again.alpha_used, saved.alpha_used)
    # ... and not the untrained hypernetworks' α: the file holds what was learned.
    initial = strategy(rc, tmp_path / "fresh").alpha_matrix(0)
    assert np.abs(initial.alpha - saved.alpha).max() > 1e-6  # float32 noise at 0.3: ~3e-8

    png = run_dir / ALPHA_PLOT
    assert png.read_bytes()[:8] == PNG_MAGIC
    # the label-overlap panel and one panel per layer: 5 panels, 4 columns x 2 rows
    height, width = imread(png).shape[:2]
    assert (width, height) == (round(3.3 * 4 * 110), round(3.1 * 2 * 110))


def test_heurpfedla_alpha_used_is_one_hot_on_self_exactly_in_its_kept_local_layers(tmp_path: Path) -> None:
    rc = run_config(tmp_path, method="heurpfedla", extra="method.options.heur_k=2")
    s = strategy(rc, tmp_path / "run")
    with torch.no_grad():  # make the raw α of every layer differ from one-hot
        for hn in s.agg.hnets:
            for head in hn.heads:
                head.bias.add_(torch.rand(head.bias.shape))
    m = s.alpha_matrix(0)
    assert m.heur_k == 2
    for i in range(3):
        local = s.agg.local_layers(i)
        assert len(local) == 2
        for layer in range(len(m.layers)):
            if layer in local:
                assert m.alpha_used[i, layer].tolist() == [float(j == i) for j in range(3)]
                assert m.alpha[i, layer, i] < 1.0  # the hypernetwork's own α is kept in `alpha`
            else:
                np.testing.assert_array_equal(m.alpha_used[i, layer], m.alpha[i, layer])


def two_groups(alpha_within: float) -> tuple[AlphaMatrix, np.ndarray]:
    """6 clients: 0, 2, 4 hold labels {0, 1}, clients 1, 3, 5 labels {2, 3}; α puts
    ``alpha_within`` of each row on the client's own group (spread evenly), the rest on the other."""
    hists = np.array([[50, 50, 0, 0] if i % 2 == 0 else [0, 0, 50, 50] for i in range(6)], dtype=float)
    alpha = np.zeros((6, 2, 6))
    for i in range(6):
        for j in range(6):
            same = i % 2 == j % 2
            alpha[i, :, j] = (alpha_within if same else 1 - alpha_within) / 3
    return AlphaMatrix(alpha, alpha.copy(), ["input", "output"], 7, list(range(6)), 0), hists


def test_label_correlation_is_high_for_label_structured_alpha_and_undefined_for_uniform() -> None:
    structured, hists = two_groups(0.9)
    overlap = label_overlap(hists)
    assert overlap[0, 2] == pytest.approx(1.0) and overlap[0, 1] == pytest.approx(0.0)
    assert all(r == pytest.approx(1.0) for r in label_correlation(structured, overlap).values())
    anti, _ = two_groups(0.1)
    assert all(r == pytest.approx(-1.0) for r in label_correlation(anti, overlap).values())
    uniform, _ = two_groups(0.5)
    assert all(math.isnan(r) for r in label_correlation(uniform, overlap).values())
    assert label_order(hists, 6).tolist() == [0, 2, 4, 1, 3, 5]
    assert label_order(None, 6).tolist() == list(range(6))


def write_run(run_dir: Path, m: AlphaMatrix, hists: np.ndarray) -> None:
    run_dir.mkdir(parents=True)
    save_alpha(run_dir / ALPHA_FILE, m)
    clients = {str(i): {"train_hist": h.astype(int).tolist()} for i, h in enumerate(hists)}
    (run_dir / "results.json").write_text(json.dumps({"clients": clients}))


def test_fedvit_alpha_draws_the_grid_and_prints_each_layers_correlation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m, hists = two_groups(0.9)
    run_dir = tmp_path / "run"
    write_run(run_dir, m, hists)
    loaded = load_alpha(run_dir)
    np.testing.assert_array_equal(loaded.alpha, m.alpha)
    assert (loaded.layers, loaded.round, loaded.trained) == (m.layers, 7, list(range(6)))

    out = tmp_path / "figs" / "a.png"
    assert main(["alpha", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["layer\tr(α, label overlap)", "input\t1.000", "output\t1.000", str(out)]
    height, width = imread(out).shape[:2]  # overlap + 2 layers: 3 panels in one row
    assert (width, height) == (round(3.3 * 3 * 110), round(3.1 * 110))
    assert plot_alpha(run_dir) == run_dir / ALPHA_PLOT and (run_dir / ALPHA_PLOT).is_file()


def test_saving_alpha_replaces_the_file_whole_with_default_permissions(tmp_path: Path) -> None:
    """A reader of ``alpha.npz`` mid-run sees one round's matrix or the next, never half a file."""
    path = tmp_path / ALPHA_FILE
    first, _ = two_groups(0.9)
    save_alpha(path, first)
    inode = path.stat().st_ino
    second, _ = two_groups(0.1)
    save_alpha(path, second)
    np.testing.assert_array_equal(load_alpha(path).alpha, second.alpha)
    assert path.stat().st_ino != inode  # renamed over, not written into
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == [ALPHA_FILE]  # no temporary file left


def test_a_run_without_alpha_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["alpha", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no alpha.npz in" in err[0] and "pFedLA" in err[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / ALPHA_FILE, alpha=np.zeros((2, 1, 3)))
    assert main(["alpha", str(bad)]) == 2
    assert "missing" in capsys.readouterr().err
