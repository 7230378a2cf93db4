"""Helpers shared by the tests that run in-process federations."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def stored_private(cid: int, run_name: str) -> dict[str, np.ndarray]:
    """Client ``cid``'s saved private state of the (single) run called ``run_name``."""
    (path,) = Path(os.environ["FEDVIT_STATE_DIR"]).glob(f"{run_name}-*/client-{cid}/private.npz")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
