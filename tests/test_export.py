"""``fedvit export``: after a tiny in-process federation, a client's exported file predicts exactly
what the client's personalized model (checkpointed shared + its private parameters) predicts,
through ``scripts/predict.py`` (torch + numpy only), from raw uint8 images."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import fedhelpers
import numpy as np
import pytest
import torch

from fedvit.cli import main as cli_main
from fedvit.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = (
    "model.depth=1 model.embed_dim=16 model.num_heads=2 data.max_train_per_client=60 "
    "train.batch_size=32 train.local_epochs=1"
)


def _predict_module():
    spec = importlib.util.spec_from_file_location("fedvit_predict_example", REPO / "scripts" / "predict.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fedper_run(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:  # module scope: the per-test state dir is not set yet
        mp.setenv("FEDVIT_STATE_DIR", str(tmp / "state"))
        rc = fedhelpers.run_config(tmp, "fedper", TINY, rounds=1)
        _, results, run_dir = fedhelpers.federate(rc)
    return rc, results, run_dir, tmp / "state"


def _state_dir(state_root: Path, cid: int) -> Path:
    (path,) = state_root.glob(f"fedper-*/client-{cid}")
    return path


def _reference_client(rc: dict, state_dir: Path, run_dir: Path, cid: int):
    """Client ``cid`` as the ClientApp builds it for evaluation, with the checkpoint's shared part."""
    from clients.base import ClientSetup, PartialClient
    from fedvit.config import fingerprint, to_dict
    from fedvit.data import load_client_datasets
    from fedvit.models import build_model
    from fedvit.params import ParameterSplit
    from fedvit.state import PrivateStore

    cfg = load_config(rc)
    model = build_model(cfg)
    split = ParameterSplit.from_model(model, cfg.method.private)
    fp = fingerprint(
        {"method": cfg.method.name, "model": to_dict(cfg)["model"], "private": split.shapes(model, "private")}
    )
    data = load_client_datasets(cfg, cid)
    client = PartialClient(
        ClientSetup(cfg, cid, model, split, data, PrivateStore(state_dir, fp), torch.device("cpu"))
    )
    with np.load(run_dir / "checkpoint" / "arrays.npz") as z:
        client.set_parameters([z[k] for k in split.shared])
    return client


@pytest.mark.timeout(300)
def test_export_predicts_like_the_clients_personalized_model(fedper_run, tmp_path: Path) -> None:
    rc, results, run_dir, state_root = fedper_run
    predict = _predict_module()
    for cid in (0, 2):
        state_dir = _state_dir(state_root, cid)
        out = tmp_path / f"client{cid}.pt2"
        argv = ["export", str(state_dir), "--run-dir", str(run_dir), "--client-id", str(cid), "-o", str(out)]
        assert cli_main(argv) == 0
        model, meta = predict.load(out)
        assert meta["client_id"] == cid and meta["method"] == "fedper" and meta["round"] == 1
        client = _reference_client(rc, state_dir, run_dir, cid)
        test = client.data.test
        raw = np.stack([test.split.images[int(j)] for j in test.indices])  # its own raw uint8 test images
        # the script's preprocessing is the training pipeline's
        x = torch.stack([test[i][0] for i in range(len(test))])
        assert torch.allclose(predict.preprocess(raw, meta["preprocess"]), x, atol=1e-5)
        with torch.no_grad():
            expected = torch.softmax(client.model.eval()(x), dim=-1).numpy()
        probs = predict.predict(model, meta, raw)
        np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-5)
        # and it is the model the federation evaluated for this client after its last round
        labels = np.asarray(test.labels)
        acc = float((probs.argmax(1) == labels).mean())
        assert acc == pytest.approx(results["rounds"][-1]["eval"]["per_client"][str(cid)]["test-acc"])
    # two clients, two personal heads: different models
    a, _ = predict.load(tmp_path / "client0.pt2")
    b, _ = predict.load(tmp_path / "client2.pt2")
    assert not torch.equal(a.state_dict()["head.weight"], b.state_dict()["head.weight"])


@pytest.mark.timeout(120)
def test_export_from_run_config_and_refusals(fedper_run, tmp_path: Path) -> None:
    rc, _, run_dir, state_root = fedper_run
    from fedvit.export import export, load_export

    ckpt = run_dir / "checkpoint"
    out = export(_state_dir(state_root, 1), tmp_path / "c1.pt2", run_config=rc, checkpoint=ckpt)
    _, meta = load_export(out)
    assert meta["preprocess"]["size"] == load_config(rc).data.image_size
    with pytest.raises(ConfigError, match=r"private\.npz"):
        export(tmp_path, tmp_path / "x.pt2", run_dir=run_dir)
    with pytest.raises(ConfigError, match="checkpoint"):
        export(_state_dir(state_root, 1), tmp_path / "x.pt2", run_config=rc)
    for method in ("fedbabu", "apfl", "fedtp"):
        with pytest.raises(ConfigError, match="not supported"):
            export(
                _state_dir(state_root, 1),
                tmp_path / "x.pt2",
                run_config={**rc, "method": method},
                checkpoint=run_dir / "checkpoint",
            )
