"""The hypernetwork methods' clients train with their papers' optimizer: the hypernetworks' step
sizes are calibrated to SGD-sized local changes, so a method YAML that silently inherits the base
AdamW 1e-3 runs a different method. Experiments whose documented numbers were measured with
AdamW pin it themselves."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from fedvit.config import CONF_DIR, load_config

# (optimizer, lr, momentum, weight decay) of each paper's clients.
FEDTP_SGD = ("sgd", 0.01, 0.9, 1e-5)  # Li et al. 2023 (FedTP) and the authors' code
PFEDLA_SGD = ("sgd", 0.01, 0.0, 0.0)  # Ma et al. 2022 (pFedLA): plain SGD, lr 0.01
PAPER_OPTIMIZER = {
    "fedtp": FEDTP_SGD,
    "fedtp-per": FEDTP_SGD,
    "fedtp-vanilla": FEDTP_SGD,
    "pfedla": PFEDLA_SGD,
    "heurpfedla": PFEDLA_SGD,
}
HYPERNETWORK_STRATEGIES = ("fedtp", "pfedla")

# Experiments documented in docs/experiments.md with AdamW 1e-3 (weight decay 0.01) for every method.
ADAMW = ("adamw", 0.001, 0.01)
ADAMW_EXPERIMENTS = {
    "cifar10-fedtp": ["fedavg", "fedtp-vanilla", "fedtp"],
    "shakespeare-fedtp": ["fedavg", "fedtp"],
    "cifar10-pathological": ["pfedla", "heurpfedla", "fedavg", "local"],
}


def optimizer_of(run_config: dict) -> tuple:
    t = load_config(run_config).train
    return (t.optimizer, t.lr, t.momentum, t.weight_decay)


@pytest.mark.parametrize("method", sorted(PAPER_OPTIMIZER))
def test_each_hypernetwork_methods_resolved_config_has_its_papers_client_optimizer(method: str) -> None:
    assert optimizer_of({"method": method}) == PAPER_OPTIMIZER[method]


def test_every_method_on_a_hypernetwork_strategy_is_checked() -> None:
    """A new FedTP or pFedLA variant must state its paper's optimizer here too."""
    on_hypernetworks = {
        path.stem
        for path in (CONF_DIR / "method").glob("*.yaml")
        if OmegaConf.load(path).get("method", {}).get("strategy") in HYPERNETWORK_STRATEGIES
    }
    assert on_hypernetworks and on_hypernetworks <= set(PAPER_OPTIMIZER)


def test_the_paper_optimizer_is_not_the_base_default() -> None:
    """What the method YAMLs override: without them the clients would use the base AdamW."""
    base = optimizer_of({"method": "fedavg"})
    assert base[0] == "adamw"
    assert all(opt[0] != base[0] for opt in PAPER_OPTIMIZER.values())


@pytest.mark.parametrize(
    ("experiment", "method"), [(e, m) for e, methods in ADAMW_EXPERIMENTS.items() for m in methods]
)
def test_documented_experiments_keep_the_adamw_they_ran_with(experiment: str, method: str) -> None:
    optimizer, lr, _, weight_decay = optimizer_of({"experiment": experiment, "method": method})
    assert (optimizer, lr, weight_decay) == ADAMW


def test_an_experiment_override_still_wins_over_the_pinned_optimizer() -> None:
    rc = {"experiment": "cifar10-fedtp", "method": "fedtp", "overrides": "train.optimizer=sgd train.lr=0.01"}
    assert optimizer_of(rc)[:2] == ("sgd", 0.01)
