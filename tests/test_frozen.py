"""``model.frozen``: named parameter groups never train (a linear probe of a pretrained backbone is
FedAvg with everything but the classifier frozen)."""

from __future__ import annotations

from pathlib import Path

import fedhelpers
import numpy as np
import pytest

from fedvit.config import ConfigError, load_config
from fedvit.models import build_model

TINY = "model.depth=2 model.embed_dim=32 model.num_heads=2 train.batch_size=64"
PROBE = "model.frozen=[patch_embed,pos_embed,norm,block.0,block.1]"


def test_frozen_groups_build_without_gradients_and_the_rest_trains() -> None:
    model = build_model(load_config({"overrides": f"{TINY} {PROBE}"}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}


def test_a_federated_linear_probe_changes_only_the_classifier(tmp_path: Path) -> None:
    rc = fedhelpers.run_config(tmp_path, "fedavg", TINY, rounds=2, extra=PROBE)
    _, results, run_dir = fedhelpers.federate(rc)
    assert results["status"] == "completed"
    initial = {k: v.detach().numpy() for k, v in build_model(load_config(rc)).state_dict().items()}
    with np.load(run_dir / "checkpoint" / "arrays.npz") as z:
        final = {k: z[k] for k in z.files}
    changed = {k for k in initial if not np.array_equal(initial[k], final[k])}
    assert changed == {"head.weight", "head.bias"}


def test_an_unknown_frozen_group_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.frozen.*'blocks'"):
        load_config({"overrides": "model.frozen=[blocks]"})
