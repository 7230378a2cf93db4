"""Issue 15's protocol batches (conf/sweep/issue15-*.yaml) say what the issue asks for: every
run's resolved config is checked here without running it (`fedvit sweep --dry-run`'s check).

FedTP: CIFAR-10, Dirichlet 0.3, >= 100 clients, <= 10% per round, every client evaluated at the
evaluated rounds, FedTP's client SGD for every method (never AdamW) and the authors' hypernetwork
SGD; the only tuned value is the labelled extra row's. Shakespeare: >= 4x issue 5's rounds.
pFedLA: 4 classes per client, 10 clients all joining and 100 with 10% per round, the authors'
hypernetwork settings, pFedLA's client SGD for every method. Anytime: the tiers, FedAvg and the last
exit head alone on one backbone, with the same data, rounds and optimizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedvit.config import CONF_DIR, load_config, to_dict
from fedvit.sweep import check, load_spec, plan, spec_from_mapping

SWEEPS = CONF_DIR / "sweep"
FEDTP_SGD = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-5}
PFEDLA_SGD = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0}


def resolved(name: str, tmp_path: Path) -> dict[str, object]:
    """Run name -> resolved config of every run of conf/sweep/<name>.yaml (out under tmp_path)."""
    data = load_spec(SWEEPS / f"{name}.yaml")
    data["out"] = str(tmp_path / name)
    spec = spec_from_mapping(data)
    return {run: cfg for run, (_, cfg) in check(spec).items()}


def optimizer(cfg) -> dict[str, object]:
    t = cfg.train
    return {"optimizer": t.optimizer, "lr": t.lr, "momentum": t.momentum, "weight_decay": t.weight_decay}


def test_every_issue15_sweep_plans_one_seeded_run_per_row_and_writes_under_outputs() -> None:
    specs = sorted(SWEEPS.glob("issue15-*.yaml"))
    assert [p.stem for p in specs] == [
        "issue15-anytime",
        "issue15-fedtp-cifar10",
        "issue15-fedtp-shakespeare",
        "issue15-pfedla-hnlr",
        "issue15-pfedla",
    ]
    for path in specs:
        spec = spec_from_mapping(load_spec(path))
        assert spec.out == f"outputs/{path.stem}" and spec.engine == "simulation"
        assert spec.seeds == [0]  # more seeds later keep these run names
        assert all(r.name.endswith(",seed=0") for r in plan(spec))


def test_fedtp_cifar10_is_the_authors_protocol_at_reduced_data_and_width(tmp_path: Path) -> None:
    cfgs = resolved("issue15-fedtp-cifar10", tmp_path)
    assert list(cfgs) == [
        f"{m},seed=0" for m in ("fedavg", "fedtp-vanilla", "fedtp", "fedtp-per", "fedtp-hnlr0.1-extra")
    ]
    for name, cfg in cfgs.items():
        assert cfg.data.name == "cifar10" and cfg.model.img_size == 32, name
        assert (cfg.data.partition.kind, cfg.data.partition.alpha) == ("dirichlet", 0.3), name
        assert cfg.clients.num_clients >= 100 and cfg.server.fraction_train <= 0.1, name
        assert cfg.server.eval_fraction == 1.0, name  # every client at every evaluated round
        assert cfg.train.local_epochs == 1 and cfg.train.batch_size == 64, name
        assert optimizer(cfg) == FEDTP_SGD, name
    assert [cfgs[f"{m},seed=0"].method.name for m in ("fedtp", "fedtp-per", "fedtp-hnlr0.1-extra")] == [
        "fedtp",
        "fedtp-per",
        "fedtp",
    ]
    for name in ("fedtp,seed=0", "fedtp-per,seed=0"):
        o = cfgs[name].method.options
        assert (o["hn_lr"], o["hn_momentum"], o["hn_weight_decay"]) == (0.01, 0.9, 0.001), name
    extra = cfgs["fedtp-hnlr0.1-extra,seed=0"].method.options
    assert (extra["hn_lr"], extra["hn_momentum"], extra["hn_weight_decay"]) == (0.1, 0.9, 0.001)
    # the experiment does not hide the method's own optimizer: the method YAML alone gives the same
    alone = load_config({"method": "fedtp"})
    assert optimizer(alone) == FEDTP_SGD


def test_fedtp_shakespeare_has_four_times_issue5s_rounds_and_fedtps_sgd(tmp_path: Path) -> None:
    issue5 = load_config({"experiment": "shakespeare-fedtp"}).server.num_rounds
    cfgs = resolved("issue15-fedtp-shakespeare", tmp_path)
    assert [c.method.name for c in cfgs.values()] == ["fedavg", "fedtp-vanilla", "fedtp", "fedtp-per"]
    for name, cfg in cfgs.items():
        assert cfg.data.name == "shakespeare" and cfg.server.num_rounds >= 4 * issue5, name
        assert optimizer(cfg) == FEDTP_SGD, name


@pytest.mark.parametrize(("experiment", "clients", "fraction"), [("10", 10, 1.0), ("100", 100, 0.1)])
def test_pfedla_is_the_papers_partition_with_the_authors_hypernetworks(
    tmp_path: Path, experiment: str, clients: int, fraction: float
) -> None:
    cfgs = {
        name: cfg
        for name, cfg in resolved("issue15-pfedla", tmp_path).items()
        if name.startswith(f"experiment=cifar10-pfedla-{experiment},")
    }
    assert sorted(c.method.name for c in cfgs.values()) == sorted(
        ["fedavg", "local", "fedper", "pfedla", "heurpfedla"]
    )
    for name, cfg in cfgs.items():
        assert cfg.data.name == "cifar10" and cfg.model.img_size == 32, name
        assert (cfg.data.partition.kind, cfg.data.partition.classes_per_client) == ("pathological", 4), name
        assert (cfg.clients.num_clients, cfg.server.fraction_train) == (clients, fraction), name
        assert cfg.server.eval_fraction == 1.0, name
        assert optimizer(cfg) == PFEDLA_SGD, name
        if cfg.method.name in ("pfedla", "heurpfedla"):
            o = cfg.method.options
            assert (o["embed_dim"], o["hidden"], o["n_layers"], o["hn_lr"]) == (100, 100, 3, 0.005), name
            assert o["heur_k"] == (2 if cfg.method.name == "heurpfedla" else 0), name


def test_the_pfedla_extra_rows_differ_from_the_authors_run_only_in_the_labelled_hn_lr(tmp_path: Path) -> None:
    authors = resolved("issue15-pfedla", tmp_path)["experiment=cifar10-pfedla-10,method=pfedla,seed=0"]
    extras = resolved("issue15-pfedla-hnlr", tmp_path)
    assert list(extras) == ["hn-lr-1,seed=0", "hn-lr-5,seed=0"]
    for name, cfg in extras.items():
        lr = float(name.split(",")[0].removeprefix("hn-lr-"))
        assert cfg.method.options == {**authors.method.options, "hn_lr": lr}, name
        mine, theirs = to_dict(cfg), to_dict(authors)
        for d in (mine, theirs):
            d["method"].pop("options")
            d["output"].pop("dir"), d["output"].pop("run_name", None)
            d["clients"].pop("state_dir", None)
        assert mine == theirs, name


def test_the_anytime_batch_compares_tiers_fedavg_and_the_last_head_on_one_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = tmp_path / "outputs" / "pretrain" / "cifar10-rgb32-vit-tiny-p8-e30.pt"
    backbone.parent.mkdir(parents=True)
    backbone.write_bytes(b"")  # the config only checks that the file exists
    monkeypatch.chdir(tmp_path)
    cfgs = resolved("issue15-anytime", tmp_path)
    assert list(cfgs) == ["anytime,seed=0", "fedavg-finetune,seed=0", "fedavg-last-head,seed=0"]
    tiers, finetune, head = cfgs.values()
    assert tiers.method.name == "anytime" and tiers.model.anytime.enabled and tiers.model.anytime.tiers
    for cfg in (finetune, head):
        assert cfg.method.name == "fedavg" and not cfg.model.anytime.enabled
    assert finetune.model.frozen == []
    every_group = ["patch_embed", "pos_embed", "norm", *(f"block.{i}" for i in range(head.model.depth))]
    assert sorted(head.model.frozen) == sorted(every_group)  # all but the classifier
    for cfg in cfgs.values():
        assert Path(cfg.model.pretrained).resolve() == backbone.resolve()
        assert (cfg.data.name, cfg.clients.num_clients, cfg.server.num_rounds) == ("femnist", 20, 30)
        assert cfg.train == tiers.train
