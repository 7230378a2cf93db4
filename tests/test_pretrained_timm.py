"""``model.pretrained='timm:<name>'``: timm's pretrained ViT weights, loaded through timm's own
loading code from the Hugging Face hub cache, arrive in fedvit's ViT (resampled patch and position
embeddings, channels adapted, a head of other classes kept fresh); a name timm does not know and
weights missing from the offline cache are one clear error each. Nothing is downloaded: the
checkpoint is written into a fake hub cache (the hub's layout) and the hub is offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import adapt_input_conv

from fedvit.config import ConfigError, load_config
from fedvit.models import build_model
from fedvit.models.vit import timm_pretrained_state
from fedvit.preflight import check

REPO = Path(__file__).resolve().parents[1]
NAME = "vit_tiny_patch16_224"  # default tag augreg_in21k_ft_in1k, served by the hub as below
HUB_REPO = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# fedvit's ViT with timm's width (192, 3 heads) but 2 blocks, 32 px images in 4-px patches, 10 classes
FITS = "model.embed_dim=192 model.num_heads=3 model.depth=2 model.patch_size=4 data.image_size=32"
RGB = "data.in_chans=3 data.mean=[0.5,0.5,0.5] data.std=[0.5,0.5,0.5]"


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache under ``tmp_path`` with the hub offline; returns the hub cache."""
    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(hub))
    # huggingface_hub reads the environment once, at import: point its constants there too
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    timm_pretrained_state.cache_clear()
    yield hub
    timm_pretrained_state.cache_clear()


def serve_in_cache(hub: Path) -> dict[str, torch.Tensor]:
    """Write a ViT-Ti/16 checkpoint (random, distinct values) as the hub serves it: ``model.safetensors``
    in the repo's snapshot, ``refs/main`` naming the snapshot. Returns the saved tensors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        state = {k: torch.randn_like(v) for k, v in timm.create_model(NAME).state_dict().items()}
    repo = hub / f"models--{HUB_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    safetensors.torch.save_file(state, str(snapshot / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return state


def cfg_of(overrides: str):
    return load_config({"method": "fedavg", "overrides": overrides})


def test_timm_weights_by_name_arrive_in_fedvits_vit_from_the_offline_hub_cache(offline_hub: Path) -> None:
    saved = serve_in_cache(offline_hub)
    fresh = build_model(cfg_of(f"{FITS} {RGB}")).state_dict()
    cfg = cfg_of(f"{FITS} {RGB} model.pretrained=timm:{NAME}")
    model = build_model(cfg)
    sd = model.state_dict()
    same = [k for k in sd if k in saved and saved[k].shape == sd[k].shape]
    assert {"cls_token", "norm.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias"} <= set(same)
    for key in same:
        assert torch.equal(sd[key], saved[key]), key
    # 14x14 grid of 16-px patches -> 8x8 grid of 4-px patches, by timm's own resampling
    assert torch.equal(
        sd["pos_embed"], resample_abs_pos_embed(saved["pos_embed"], (8, 8), num_prefix_tokens=1)
    )
    expected = resample_patch_embed(saved["patch_embed.proj.weight"], [4, 4])
    assert torch.equal(sd["patch_embed.proj.weight"], expected)
    assert torch.equal(sd["patch_embed.proj.bias"], saved["patch_embed.proj.bias"])
    # 1000 ImageNet classes vs 10: the head keeps the fresh init
    assert torch.equal(sd["head.weight"], fresh["head.weight"])
    assert not torch.equal(sd["blocks.0.attn.qkv.weight"], fresh["blocks.0.attn.qkv.weight"])


def test_one_channel_models_get_timms_rgb_filters_summed_over_channels(offline_hub: Path) -> None:
    saved = serve_in_cache(offline_hub)
    model = build_model(cfg_of(f"{FITS} data.in_chans=1 model.pretrained=timm:{NAME}"))
    expected = adapt_input_conv(1, resample_patch_embed(saved["patch_embed.proj.weight"], [4, 4]))
    assert torch.equal(model.state_dict()["patch_embed.proj.weight"], expected)
    assert torch.allclose(
        expected, resample_patch_embed(saved["patch_embed.proj.weight"], [4, 4]).sum(1, True)
    )


def test_a_model_of_another_width_takes_nothing_and_says_so(offline_hub: Path) -> None:
    serve_in_cache(offline_hub)
    with pytest.raises(ConfigError, match=r"model.pretrained.*no tensor of timm:vit_tiny_patch16_224 fits"):
        build_model(cfg_of(f"model.embed_dim=64 model.pretrained=timm:{NAME}"))


def test_weights_missing_from_the_offline_cache_are_one_clear_error(offline_hub: Path) -> None:
    cfg = cfg_of(f"{FITS} model.pretrained=timm:{NAME}")  # valid: the name is known, no file check
    with pytest.raises(ConfigError) as err:
        build_model(cfg)
    msg = str(err.value)
    assert "model.pretrained" in msg and "not in the local Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE is set" in msg and str(offline_hub) in msg
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        check(cfg)  # the preflight of `fedvit run` says the same before anything starts


def test_fedvit_run_refuses_missing_offline_weights_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    """A fresh process reads HF_HUB_OFFLINE / HF_HOME itself; the preflight stops the run at once."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    env.pop("HF_HUB_CACHE", None)
    over = f"{FITS} model.pretrained=timm:{NAME}"
    cmd = [sys.executable, "-m", "fedvit.cli", "run", str(REPO), "-q", "-c", f"overrides='{over}'"]
    cmd += ["-c", f"output-dir='{tmp_path / 'out'}'"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    want = "fedvit: error: key 'model.pretrained': the weights of timm:vit_tiny_patch16_224 are not in"
    assert lines[0].startswith(want)
    assert "HF_HUB_OFFLINE is set" in lines[0] and str(tmp_path / "hf" / "hub") in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["vit_no_such_model", "vit_tiny_patch16_224.no_such_tag"])
def test_config_rejects_a_timm_name_timm_does_not_know(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"key 'model.pretrained': 'timm:{name}': timm has no model"):
        cfg_of(f"model.pretrained=timm:{name}")


def test_config_accepts_a_known_timm_name_without_any_file() -> None:
    assert cfg_of(f"model.pretrained=timm:{NAME}").model.pretrained == f"timm:{NAME}"
