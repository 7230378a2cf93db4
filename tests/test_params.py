"""Named parameter groups by exact module path, and the shared/private split."""

from __future__ import annotations

import numpy as np
import pytest

from fedvit.config import FedvitConfig
from fedvit.models import build_model
from fedvit.params import (
    LAYER_TYPES,
    ParameterSplit,
    UpdateError,
    check_arrays,
    get_arrays,
    parameter_groups,
)


@pytest.fixture(scope="module")
def model():
    cfg = FedvitConfig()
    cfg.model.depth = 12  # blocks.1 vs blocks.10 / blocks.11
    return build_model(cfg)


def test_layer_type_groups_cover_every_tensor(model) -> None:
    groups = parameter_groups(model)
    keys = set(model.state_dict())
    covered = set().union(*(groups[g] for g in LAYER_TYPES))
    assert covered == keys
    assert set(groups["all"]) == keys


def test_groups_use_exact_module_paths_not_substrings(model) -> None:
    groups = parameter_groups(model)
    assert all(k.startswith("blocks.1.") for k in groups["block.1"])
    assert not any(k.startswith("blocks.10.") for k in groups["block.1"])
    assert groups["block.-1"] == groups["block.11"]
    assert set(groups["attn.qkv"]) == {
        f"blocks.{i}.attn.qkv.{p}" for i in range(12) for p in ("weight", "bias")
    }
    assert set(groups["head"]) == {"head.weight", "head.bias", "norm.weight", "norm.bias"}
    assert set(groups["classifier"]) == {"head.weight", "head.bias"}
    assert set(groups["pos_embed"]) == {"pos_embed", "cls_token"}
    assert "blocks.0.norm1.weight" in groups["norm"] and "blocks.0.norm1.weight" not in groups["attn"]


@pytest.mark.parametrize(
    ("private", "expected_private"),
    [
        ([], set()),
        (["head"], {"head.weight", "head.bias", "norm.weight", "norm.bias"}),
        (["all"], None),
    ],
)
def test_split_partitions_the_state_dict(model, private, expected_private) -> None:
    split = ParameterSplit.from_model(model, private)
    keys = list(model.state_dict())
    assert set(split.shared) | set(split.private) == set(keys)
    assert not set(split.shared) & set(split.private)
    assert set(split.private) == (set(keys) if expected_private is None else expected_private)
    assert list(split.shared) == [k for k in keys if k in split.shared]  # state-dict order


def test_unknown_group_is_refused(model) -> None:
    with pytest.raises(ValueError, match="tail"):
        ParameterSplit.from_model(model, ["tail"])


def test_check_arrays_rejects_wrong_names_shapes_dtypes_and_nan(model) -> None:
    split = ParameterSplit.from_model(model, ["head"])
    shapes = split.shapes(model, "shared")
    good = get_arrays(model, split.shared)
    check_arrays(good, shapes, who="c")
    bad_cases = {
        "unknown": {**good, "head.weight": np.zeros((10, 64), np.float32)},
        "missing": {k: v for k, v in good.items() if k != "pos_embed"},
        "shape": {**good, "pos_embed": np.zeros((1, 2, 3), np.float32)},
        "dtype": {**good, "pos_embed": good["pos_embed"].astype(np.int64)},
        "NaN": {**good, "pos_embed": np.full_like(good["pos_embed"], np.nan)},
        "Inf": {**good, "cls_token": np.full_like(good["cls_token"], np.inf)},
    }
    for what, arrays in bad_cases.items():
        with pytest.raises(UpdateError, match="client 7"):
            check_arrays(arrays, shapes, who="client 7")
        assert what
