"""``fedvit pretrain`` as a real pretraining: batch augmentation (padded random crop, flips only
where they keep the class), linear warm-up then cosine learning rate, label smoothing, a resumable
checkpoint that an interrupted pretraining continues step-exactly, and a JSON next to the weights
with the settings, epochs, seconds and the backbone's own test accuracy."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedvit.cli import main as cli_main
from fedvit.config import ConfigError, load_config
from fedvit.data import ImageDataset, make_transform, prepared_source
from fedvit.models import build_model
from fedvit.pretrain import (
    PretrainOptions,
    augment_batch,
    lr_factor,
    pretrain,
    resolve_augment,
    resume_path,
    summary_path,
)
from fedvit.training import evaluate, make_loader

TINY = (
    "model.depth=2 model.embed_dim=16 model.num_heads=2 train.batch_size=32 "
    "train.optimizer=adamw train.lr=0.003"
)


def tiny_cfg(tmp_path: Path, extra: str = ""):
    return load_config(
        {"method": "fedavg", "overrides": f"{TINY} data.cache_dir={tmp_path / 'cache'} {extra}"}
    )


class Interrupted(Exception):
    pass


# --------------------------------------------------------------------------- schedule


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr() -> None:
    total, warmup = 20, 4
    f = [lr_factor(s, total, warmup, "cosine", 0.1) for s in range(total)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # linear, from near 0
    assert f[4] == 1.0 and f[-1] == pytest.approx(0.1)  # peak after the warm-up, min_lr at the last step
    assert all(a > b for a, b in itertools.pairwise(f[4:]))  # strictly decreasing after the peak
    mid = 4 + (total - 4 - 1) / 2
    assert lr_factor(int(mid), total, warmup, "cosine", 0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (int(mid) - 4) / 15))
    )
    assert [lr_factor(s, total, 2, "constant", 0.0) for s in (0, 1, 2, 19)] == pytest.approx(
        [1 / 3, 2 / 3, 1, 1]
    )


# --------------------------------------------------------------------------- augmentation


def test_crop_takes_a_shifted_window_of_the_zero_padded_image() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) + 1  # no zeros inside
    out = augment_batch(x, 2, False, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    assert out.shape == x.shape
    for i in range(2):
        windows = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 6])
        ]
        assert len(windows) == 1
    shifts = {
        tuple(augment_batch(x, 2, False, torch.Generator().manual_seed(s))[0, 0, 2:4, 2:4].flatten().tolist())
        for s in range(20)
    }
    assert len(shifts) > 5  # the crop moves


def test_flip_mirrors_about_half_of_the_batch_and_nothing_else() -> None:
    x = torch.randn(200, 1, 4, 4)
    out = augment_batch(x, 0, True, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x, strict=True)])
    assert bool((flipped ^ kept).all()) and 70 < int(flipped.sum()) < 130
    assert torch.equal(augment_batch(x, 0, False, torch.Generator()), x)


def test_auto_augment_flips_rgb_photos_but_never_characters_or_scans() -> None:
    assert resolve_augment("auto", 3) == (True, True)
    assert resolve_augment("auto", 1) == (True, False)  # a mirrored 'b' is a 'd'
    assert resolve_augment("none", 3) == (False, False)
    assert resolve_augment("crop", 3) == (True, False)
    assert resolve_augment("crop-flip", 1) == (True, True)


# --------------------------------------------------------------------------- resume


def test_an_interrupted_pretraining_resumes_to_exactly_the_uninterrupted_weights(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path)
    opts = PretrainOptions(epochs=2, max_examples=96, warmup_steps=2, label_smoothing=0.1, checkpoint_every=2)
    whole = pretrain(cfg, tmp_path / "whole.pt", options=opts)

    out = tmp_path / "cut.pt"

    def stop_at_step_4(line: str) -> None:  # mid-epoch 2 (3 batches per epoch)
        if "checkpoint at step 4/" in line:
            raise Interrupted

    with pytest.raises(Interrupted):
        pretrain(cfg, out, options=opts, progress=stop_at_step_4)
    assert resume_path(out).is_file() and not out.exists()
    lines: list[str] = []
    resumed = pretrain(cfg, out, options=opts, progress=lines.append)
    assert any("resuming" in line and "step 4/6" in line for line in lines)
    a, b = torch.load(tmp_path / "whole.pt")["model"], torch.load(out)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_acc"] == whole["test_acc"]
    for h in (resumed["history"], whole["history"]):
        for epoch in h:
            epoch.pop("seconds")
    assert resumed["history"] == whole["history"]  # epoch 2's running loss spans the interruption
    assert not resume_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_a_checkpoint_written_with_other_settings_is_refused(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path)
    out = tmp_path / "b.pt"

    def stop(line: str) -> None:
        if "epoch 1/" in line:
            raise Interrupted

    with pytest.raises(Interrupted):
        pretrain(cfg, out, options=PretrainOptions(epochs=2, max_examples=64), progress=stop)
    with pytest.raises(
        ConfigError, match=r"b\.pt\.resume was written with other settings.*options\.label_smoothing"
    ):
        pretrain(cfg, out, options=PretrainOptions(epochs=2, max_examples=64, label_smoothing=0.2))


# --------------------------------------------------------------------------- CLI and summary


def test_the_cli_writes_weights_and_a_json_with_settings_epochs_seconds_and_test_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "w" / "backbone.pt"
    over = f"{TINY} data.cache_dir={tmp_path / 'cache'}"
    argv = [
        "pretrain",
        "-c",
        f"overrides='{over}'",
        "--out",
        str(out),
        "--epochs",
        "2",
        "--max-examples",
        "64",
    ]
    argv += ["--augment", "none", "--schedule", "constant", "--warmup-steps", "1", "--label-smoothing", "0.1"]
    assert cli_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(summary_path(out).read_text())
    assert summary_path(out) == tmp_path / "w" / "backbone.json" and saved == printed
    assert saved["epochs"] == 2 and saved["steps"] == 4 and saved["seconds"] > 0
    assert saved["options"]["label_smoothing"] == 0.1 and saved["augment"] == {
        "crop_padding": 0,
        "flip": False,
    }
    assert saved["train"]["optimizer"] == "adamw" and saved["train"]["lr"] == 0.003
    assert [h["lr"] for h in saved["history"]] == [0.003, 0.003]  # constant after the warm-up step
    # the recorded accuracy is the saved backbone's on the test split
    cfg = tiny_cfg(tmp_path, f"model.pretrained={out}")
    source = prepared_source(cfg)
    test = ImageDataset(source.test, np.arange(len(source.test)), make_transform(cfg))
    ev = evaluate(build_model(cfg), make_loader(test, 256, shuffle=False), torch.device("cpu"))
    assert saved["test_acc"] == ev.accuracy and saved["test_examples"] == len(test)


def test_the_cli_refuses_a_bad_option_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["pretrain", "--out", str(tmp_path / "x.pt"), "--label-smoothing", "1.5"]
    assert cli_main(argv) == 2
    assert "label_smoothing must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
