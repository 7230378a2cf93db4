"""Per-client metric summaries and resource accounting.

Every client evaluates its own personalized model; a round's result is the distribution of
those per-client numbers. :func:`summarize` reduces it to the statistics reported in
``results.json``: unweighted mean (each client counts once: the pFL headline number),
mean weighted by test examples, std, quantiles 10/50/90, min and max.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedvit.params import ParameterSplit, count

QUANTILES = (10, 50, 90)


def summarize(values: Mapping[int, float], weights: Mapping[int, float] | None = None) -> dict[str, float]:
    """Statistics of one metric over clients (``values``: client id -> value).

    ``weights`` (client id -> number of examples) gives the weighted mean; clients with a
    NaN value (e.g. an empty split) are left out.
    """
    ids = [cid for cid, v in values.items() if v is not None and np.isfinite(v)]
    if not ids:
        return {"n": 0}
    v = np.array([values[c] for c in ids], dtype=float)
    out = {
        "n": len(ids),
        "mean": float(v.mean()),
        "std": float(v.std(ddof=0)),
        "min": float(v.min()),
        "max": float(v.max()),
    }
    for q in QUANTILES:
        out[f"q{q}"] = float(np.percentile(v, q))
    if weights is not None:
        w = np.array([float(weights.get(c, 0.0)) for c in ids])
        out["weighted_mean"] = float((v * w).sum() / w.sum()) if w.sum() > 0 else float("nan")
    return out


def eval_mode(round_entry: Mapping[str, Any]) -> str:
    """``full`` (every client evaluated) or ``sampled`` for an evaluated round of ``results.json``
    (records written before sampled evaluation existed are full). Here, below both
    :mod:`fedvit.results` and :mod:`fedvit.plots`, which read it."""
    return str(round_entry["eval"].get("mode", "full"))


def flops_per_sample(model: nn.Module, example: tuple[int, ...] | torch.Tensor) -> int:
    """Forward FLOPs for one sample (``torch.utils.flop_counter``; a multiply-add = 2).

    ``example`` is one input with its batch axis (:func:`fedvit.models.example_input`: float
    images or ``int64`` token indices), or the shape of one float input without it.
    """
    was_training = model.training
    model.eval()
    # Fused attention on CPU (``_scaled_dot_product_flash_attention_for_cpu``) is invisible to
    # the counter; the explicit q@k / attn@v path is counted, so use it while counting.
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    for m, _ in fused:
        m.fused_attn = False
    device = next(model.parameters()).device
    x = example.to(device) if isinstance(example, torch.Tensor) else torch.zeros((1, *example), device=device)
    if len(x) != 1:
        raise ValueError(f"flops_per_sample needs one sample (batch axis 1), got shape {tuple(x.shape)}")
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        for m, flag in fused:
            m.fused_attn = flag
        model.train(was_training)
    return int(counter.get_total_flops())


def resource_counts(
    model: nn.Module, split: ParameterSplit, example: tuple[int, ...] | torch.Tensor
) -> dict[str, float]:
    """What one client stores, computes and communicates, per method.

    * ``params_stored_per_client``: every parameter the client holds (shared + private).
    * ``params_private_per_client``: the part that never leaves the client.
    * ``params_sent_up_per_round`` / ``params_sent_down_per_round``: the shared split, per
      participating client and round (a method that sends more, e.g. generated weights,
      reports its own numbers).
    * ``flops_per_sample``: forward FLOPs of the personalized model for one input (``example``, as
      in :func:`flops_per_sample`).
    * ``bytes_*``: the same, as float32 bytes on the wire.
    """
    shared = count(split.shapes(model, "shared"))
    private = count(split.shapes(model, "private"))
    return {
        "params_stored_per_client": shared + private,
        "params_private_per_client": private,
        "params_sent_up_per_round": shared,
        "params_sent_down_per_round": shared,
        "bytes_sent_up_per_round": 4 * shared,
        "bytes_sent_down_per_round": 4 * shared,
        "flops_per_sample": flops_per_sample(model, example),
    }
