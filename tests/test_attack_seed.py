"""A simulated Gaussian attacker draws fresh noise every round (fedvit.robust.attack_seed): its
noise stream is keyed by (run seed, client, round), so it is reproducible but never repeats."""

from __future__ import annotations

from pathlib import Path

import fedhelpers
import numpy as np
import pytest

from fedvit.robust import attack_seed

TINY = "model.depth=1 model.embed_dim=16 model.num_heads=2 data.max_train_per_client=60 train.batch_size=32"


def draw(seed: int, client: int, rnd: int) -> np.ndarray:
    return np.random.default_rng(attack_seed(seed, client, rnd)).normal(size=8)


def test_the_attack_seed_differs_per_round_client_and_run_seed_and_repeats_for_the_same_triple() -> None:
    base = draw(0, 1, 1)
    np.testing.assert_array_equal(base, draw(0, 1, 1))
    for other in (draw(0, 1, 2), draw(0, 2, 1), draw(1, 1, 1)):
        assert not np.allclose(base, other)
    # no collision of the old linear rule seed * 7919 + client + ...: (1, 0) vs (0, 7919)
    assert not np.allclose(draw(1, 0, 1), draw(0, 7919, 1))
    with pytest.raises(ValueError, match="must be >= 0"):
        attack_seed(0, -1, 1)


def test_a_gaussian_attacker_sends_different_noise_in_each_round(tmp_path: Path, train_replies) -> None:
    extra = (
        "method.options.attack=gaussian method.options.attack_fraction=0.34 method.options.attack_scale=2.0"
    )
    _, results, _ = fedhelpers.federate(fedhelpers.run_config(tmp_path, "ffgg", TINY, 2, extra))
    (attacker,) = results["attackers"]
    key = "blocks.0.attn.qkv.weight"
    sent = [r.content["arrays"][key].numpy() for c, r in train_replies if c == attacker]
    assert len(sent) == 2
    assert 1.5 < float(np.std(sent[0])) < 2.5  # noise of std attack_scale, not a gradient
    assert not np.allclose(sent[0], sent[1])
