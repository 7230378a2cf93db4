"""Integration on the staged official OrganAMNIST npz (skipped when ../shared/data is absent):
a short in-process federation learns well above chance for every method of the foundation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedvit.config import load_config
from fedvit.inprocess import InProcessGrid
from fedvit.server_app import run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["fedavg", "fedper"])
def test_short_federation_on_organamnist_beats_chance(tmp_path: Path, shared_data: Path, method: str) -> None:
    rc = {
        "experiment": "organamnist-pfl",
        "method": method,
        "data-dir": str(shared_data),
        "num-clients": 4,
        "num-server-rounds": 2,
        "output-dir": str(tmp_path),
        "run-name": method,
        "overrides": f"data.max_train_per_client=400 data.cache_dir={tmp_path / 'cache'} output.plots=false",
    }
    cfg = load_config(rc)
    run_dir = run(InProcessGrid(rc, 4), cfg)
    results = json.loads((run_dir / "results.json").read_text())
    last = results["summary"]["last_round"]["test_acc"]
    assert last["n"] == 4
    assert last["mean"] > 2 / 11  # 11 classes: at least twice chance after two short rounds
    assert sum(c["num_test"] for c in results["clients"].values()) > 0
