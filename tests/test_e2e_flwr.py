"""End to end through Flower's real simulation engine: ``flwr run`` on a private SuperLink
(Ray backend), the fedvit ServerApp and ClientApp, 3 clients, 2 rounds, a tiny ViT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedvit.runner import run_flwr

REPO = Path(__file__).resolve().parents[1]
TINY = "model.depth=2 model.embed_dim=32 model.num_heads=2 train.local_epochs=1"

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(420)
def test_flwr_run_trains_fedper_and_writes_complete_results(tmp_path: Path) -> None:
    outcome = run_flwr(
        REPO,
        {
            "method": "fedper",
            "num-server-rounds": 2,
            "num-clients": 3,
            "output-dir": str(tmp_path / "out"),
            "run-name": "e2e",
            "overrides": f"{TINY} data.cache_dir={tmp_path / 'cache'} clients.state_dir={tmp_path / 'state'}",
        },
        stream=False,
        timeout_s=400,
    )
    assert outcome.ok, f"{outcome.status}: {outcome.details}\n" + "\n".join(outcome.log_tail)
    run_dir = tmp_path / "out" / "e2e"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for r in results["rounds"]:
        assert sorted(r["train"]["clients"]) == [0, 1, 2]
        assert sorted(r["eval"]["per_client"], key=int) == ["0", "1", "2"]
        assert 0.0 <= r["eval"]["test_acc"]["mean"] <= 1.0
    for name in ("config.yaml", "metrics.csv", "clients.csv", "accuracy.png", "clients.png", "checkpoint"):
        assert (run_dir / name).exists(), name
    # each simulated client kept its private head in its own state directory
    for cid in range(3):
        assert (tmp_path / "state" / f"client-{cid}" / "fedper-vit-tiny-digits" / "private.npz").is_file()


@pytest.mark.timeout(300)
def test_flwr_run_that_fails_on_the_clients_is_reported_as_failed(tmp_path: Path) -> None:
    # Bad input the submitting machine can see (a missing data file) is refused before anything
    # starts (tests/test_preflight.py); a divergent learning rate only shows on the clients.
    outcome = run_flwr(
        REPO,
        {
            "num-server-rounds": 1,
            "num-clients": 2,
            "output-dir": str(tmp_path / "out"),
            "overrides": f"{TINY} data.cache_dir={tmp_path / 'cache'} train.lr=1e30 train.grad_clip=null",
        },
        stream=False,
        timeout_s=280,
    )
    assert not outcome.ok
    assert outcome.returncode != 0
    assert "lower train.lr" in outcome.details + "\n".join(outcome.log_tail)
