"""Helpers shared by the tests that run in-process federations."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def state_files(run_name: str, cid: int | str = "*") -> list[Path]:
    """Saved private states of the run called ``run_name``: in simulation under its run directory
    (``<run dir>/clients/client-<id>/``), else under ``$FEDVIT_STATE_DIR/<run-key>/client-<id>/``."""
    with_run = Path(os.environ["FEDVIT_TEST_ROOT"]).glob(f"**/{run_name}/clients/client-{cid}/private.npz")
    elsewhere = Path(os.environ["FEDVIT_STATE_DIR"]).glob(f"{run_name}-*/client-{cid}/private.npz")
    return sorted([*with_run, *elsewhere])


def stored_private(cid: int, run_name: str) -> dict[str, np.ndarray]:
    """Client ``cid``'s saved private state of the (single) run called ``run_name``."""
    (path,) = state_files(run_name, cid)
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def run_config(
    tmp_path: Path,
    method: str,
    tiny: str,
    rounds: int = 1,
    extra: str = "",
    cache: Path | None = None,
    **keys,
) -> dict:
    """Run config of a small in-process federation of 3 clients on digits (``tiny``: model and
    data overrides); ``keys`` are further Flower run-config keys (``resume=...``)."""
    return {
        "method": method,
        "num-server-rounds": rounds,
        "num-clients": 3,
        "output-dir": str(tmp_path / "out"),
        "run-name": method,
        "overrides": f"{tiny} data.cache_dir={cache or tmp_path / 'cache'} output.plots=false {extra}",
        **keys,
    }


def federate(rc: dict):
    """Run ``rc`` in-process (the real ServerApp and ClientApp); (grid, results.json, run dir)."""
    from fedvit.config import load_config
    from fedvit.inprocess import InProcessGrid
    from fedvit.server_app import run

    grid = InProcessGrid(rc, rc["num-clients"])
    run_dir = run(grid, load_config(rc))
    return grid, json.loads((run_dir / "results.json").read_text()), run_dir


#: A sweep run's tiny setting (tests/test_sweep*.py).
SWEEP_TINY = "data.max_train_per_client=30 train.batch_size=32 output.plots=false clients.device=cpu"


def tiny_sweep_base(cache: Path, rounds: int = 2) -> dict:
    """A sweep's base run config: digits, 3 clients, vit-micro, 1 local epoch (seconds a run)."""
    return {
        "dataset": "digits",
        "model": "vit-micro",
        "num-clients": 3,
        "num-server-rounds": rounds,
        "local-epochs": 1,
        "overrides": f"{SWEEP_TINY} data.cache_dir={cache}",
    }
