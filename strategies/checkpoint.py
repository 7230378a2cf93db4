"""The server's checkpoint: ``<run dir>/checkpoint/``, replaced atomically after every round.

Layout: ``arrays.npz`` (the shared arrays after the round), ``strategy.npz`` (the arrays of the
strategy's own state, :meth:`~strategies.base.PersonalizedStrategy.state_dict`) and
``state.json`` (``round``, ``run_name``, ``run_key``, ``strategy`` = the class name, and
``state``: the JSON part of the strategy's state). A new checkpoint is written to
``checkpoint.tmp`` and renamed into place, so a crash leaves the previous one whole.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedvit.results import atomic_write_text


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint holds."""

    round: int
    run_key: str | None
    strategy: str | None  #: the class that wrote it
    arrays: dict[str, np.ndarray]  #: the shared arrays
    extra_arrays: dict[str, np.ndarray]  #: the strategy's own arrays
    state: dict[str, Any]  #: the strategy's own JSON state


def write_checkpoint(
    checkpoint_dir: Path,
    *,
    server_round: int,
    run_name: str,
    run_key: str,
    strategy: str,
    arrays: dict[str, np.ndarray],
    extra_arrays: dict[str, np.ndarray],
    state: dict[str, Any],
) -> None:
    """Atomically replace ``checkpoint_dir`` with the state after ``server_round``."""
    tmp = checkpoint_dir.with_name(checkpoint_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.savez(tmp / "arrays.npz", **arrays)
    np.savez(tmp / "strategy.npz", **extra_arrays)
    meta = {
        "round": server_round,
        "run_name": run_name,
        "run_key": run_key,
        "strategy": strategy,
        "state": state,
    }
    atomic_write_text(tmp / "state.json", json.dumps(meta, indent=1))
    old = checkpoint_dir.with_name(checkpoint_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if checkpoint_dir.exists():
        checkpoint_dir.rename(old)
    tmp.rename(checkpoint_dir)
    shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(checkpoint_dir: Path) -> Checkpoint:
    """What :func:`write_checkpoint` wrote (``FileNotFoundError`` naming the directory if nothing)."""
    state_path = checkpoint_dir / "state.json"
    if not state_path.is_file():
        raise FileNotFoundError(f"server.resume: no checkpoint in {checkpoint_dir} (missing state.json)")
    meta = json.loads(state_path.read_text())
    with np.load(checkpoint_dir / "arrays.npz") as z:
        arrays = {k: z[k] for k in z.files}
    with np.load(checkpoint_dir / "strategy.npz") as z:
        extra = {k: z[k] for k in z.files}
    return Checkpoint(
        int(meta["round"]), meta.get("run_key"), meta.get("strategy"), arrays, extra, meta.get("state", {})
    )
