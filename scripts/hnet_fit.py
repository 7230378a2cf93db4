"""What a hypernetwork's training added to its seeded initialization (shared by
``fedtp_hnet_movement.py`` and ``pfedla_hnet_movement.py``): per parameter group, the
least-squares fit ``final ≈ s · init + r``. Weight decay alone shrinks every tensor by one common
``s`` and leaves ``r = 0``; what the gradient steps added is ``r``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def fit(final: np.ndarray, init: np.ndarray) -> tuple[float, float]:
    """``(s, residual)``: the least-squares ``s`` of ``final ≈ s·init`` and the relative residual
    ``|final − s·init| / |final|`` (``s`` is NaN for an all-zero ``init``: then ``r = final``)."""
    a, b = init.ravel().astype(np.float64), final.ravel().astype(np.float64)
    s = float(a @ b / (a @ a)) if a @ a > 0 else float("nan")
    r = b - (s * a if a @ a > 0 else 0.0)
    return s, float(np.linalg.norm(r) / max(np.linalg.norm(b), 1e-30))


def group_fits(
    init: Mapping[str, np.ndarray], final: Mapping[str, np.ndarray], keys: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """``(s, |r|/|final|)`` of every tensor in ``keys`` whose initialization is not all zero."""
    fits = [fit(final[k], init[k]) for k in keys if np.linalg.norm(init[k]) > 0]
    if not fits:
        return np.array([]), np.array([])
    s, r = np.array(fits).T
    return s, r


def print_group_fits(
    rows: Mapping[str, Sequence[str]], init: Mapping[str, np.ndarray], final: Mapping[str, np.ndarray]
) -> None:
    """One line per group: the range of ``s`` and of ``|r|/|final|`` over its tensors; a group
    initialized at zero (biases) prints the largest ``|final|`` entry instead (all of it is ``r``)."""
    for label, keys in rows.items():
        s, r = group_fits(init, final, keys)
        if s.size:
            print(f"  {label:28s} s {s.min():.6f}..{s.max():.6f}   |r|/|final| {r.min():.2e}..{r.max():.2e}")
        elif keys:
            largest = max(float(np.abs(final[k]).max()) for k in keys)
            print(f"  {label:28s} initialized at 0; largest |final| entry {largest:.2e}")
