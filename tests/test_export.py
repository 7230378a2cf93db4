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
    """Client ``cid``'s state directory: with its simulated run (``<run dir>/clients``), or under
    ``state_root`` for a run whose clients keep it elsewhere."""
    (path,) = [*state_root.parent.glob(f"out/*/clients/client-{cid}"), *state_root.glob(f"*-*/client-{cid}")]
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


# --------------------------------------------------------------------------- anytime: cut at an exit

ANYTIME = (
    "model.depth=3 model.embed_dim=16 model.num_heads=2 model.anytime.width=8 model.anytime.tiers=[1,3] "
    "method.private=[backbone,client_token,exit] data.max_train_per_client=60 train.batch_size=32 "
    "train.local_steps=2"
)


@pytest.fixture(scope="module")
def anytime_run(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("export-anytime")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDVIT_STATE_DIR", str(tmp / "state"))
        rc = fedhelpers.run_config(tmp, "anytime", ANYTIME, rounds=1)
        _, results, run_dir = fedhelpers.federate(rc)
    return rc, results, run_dir, tmp / "state"


@pytest.mark.timeout(300)
def test_an_anytime_export_is_cut_at_the_chosen_exit_and_predicts_what_the_federation_evaluated(
    anytime_run, tmp_path: Path
) -> None:
    from fedvit.data import load_client_datasets

    rc, results, run_dir, state_root = anytime_run
    predict = _predict_module()
    per_client = results["rounds"][-1]["eval"]["per_client"]
    for cid, exit_, label in ((0, None, "exit1"), (1, None, "exit3"), (1, 2, "exit2"), (1, 1, "exit1")):
        state_dir = _state_dir(state_root, cid)
        out = tmp_path / f"client{cid}-{exit_}.pt2"
        argv = ["export", str(state_dir), "--run-dir", str(run_dir), "--client-id", str(cid), "-o", str(out)]
        assert cli_main([*argv, *(["--exit", str(exit_)] if exit_ else [])]) == 0
        model, meta = predict.load(out)
        assert (meta["tier"], meta["exit"]) == (1 if cid == 0 else 3, int(label.removeprefix("exit")))
        test = load_client_datasets(load_config(rc), cid).test
        raw = np.stack([test.split.images[int(j)] for j in test.indices])
        acc = float((predict.predict(model, meta, raw).argmax(1) == np.asarray(test.labels)).mean())
        # the exit's accuracy as the federation measured it for this client (private exit head)
        assert acc == pytest.approx(per_client[str(cid)][f"test-acc-{label}"])
        # nothing after the exit is in the file: no deeper block, no deeper adapter
        depths = {
            (k.split(".")[0], int(k.split(".")[1])) for k in model.state_dict() if k[:7] in "blocks.adapters"
        }
        assert max(d for part, d in depths if part == "blocks") == meta["exit"] - 1  # 0-based
        assert max(d for part, d in depths if part == "adapters") == meta["exit"]


@pytest.mark.timeout(120)
def test_an_anytime_export_refuses_an_exit_beyond_the_tier_or_off_the_exits(
    anytime_run, fedper_run, tmp_path
) -> None:
    from fedvit.export import export

    rc, _, run_dir, state_root = anytime_run
    tier1 = _state_dir(state_root, 0)
    with pytest.raises(ConfigError, match="tier 1; it never trained a deeper exit"):
        export(tier1, tmp_path / "x.pt2", run_dir=run_dir, client_id=0, exit=3)
    with pytest.raises(ConfigError, match=r"exits are at depths \[1, 2, 3\]"):
        export(tier1, tmp_path / "x.pt2", run_dir=run_dir, client_id=0, exit=4)
    ckpt = run_dir / "checkpoint"
    tuned = {**rc, "overrides": rc["overrides"] + " method.options.finetune_steps=2"}
    with pytest.raises(ConfigError, match="finetune_steps=2 fine-tunes at each evaluation"):
        export(tier1, tmp_path / "x.pt2", run_config=tuned, checkpoint=ckpt)
    _, _, frun, fstate = fedper_run
    with pytest.raises(ConfigError, match="has no early exits"):
        export(_state_dir(fstate, 0), tmp_path / "x.pt2", run_dir=frun, exit=1)
    assert not list(tmp_path.glob("*.pt2")) and not list(tmp_path.glob(".*tmp"))


def test_a_simulated_clients_state_directory_finds_its_run_without_being_told(
    fedper_run, tmp_path: Path
) -> None:
    _, _, run_dir, state_root = fedper_run
    state_dir = _state_dir(state_root, 2)
    assert state_dir.parent.parent == run_dir  # the state went with the run
    out = tmp_path / "client2.pt2"
    assert cli_main(["export", str(state_dir), "--client-id", "2", "-o", str(out)]) == 0
    assert out.is_file()


def test_an_export_policy_holds_for_the_client_class_that_declares_it_and_its_subclasses() -> None:
    """The default policy refuses a client that overrides an evaluation hook of the class that
    declared the policy; a class with its own policy answers for its own hooks only."""
    from clients.base import PartialClient
    from fedvit.export import ExportPolicy

    cfg = load_config({"method": "fedavg"})

    class Adapted(PartialClient):
        def personalize_for_eval(self, server_round: int) -> None:
            pass

    class Declared(Adapted):
        export = ExportPolicy()  # its evaluation is its model: exported as it is

    class Further(Declared):
        def evaluate(self, parameters, config):
            return super().evaluate(parameters, config)

    PartialClient.export.check(PartialClient, cfg)
    Declared.export.check(Declared, cfg)
    with pytest.raises(ConfigError, match=r"\(Adapted\) overrides personalize_for_eval, so .* not supported"):
        Adapted.export.check(Adapted, cfg)
    with pytest.raises(ConfigError, match=r"\(Further\) overrides evaluate, so"):
        Further.export.check(Further, cfg)
