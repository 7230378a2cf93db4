"""Client-level differential privacy of the shared split (issue 18).

What is protected: the shared parameters a round releases. Each sampled client's **shared update**
is clipped to L2 norm ``C`` (``dp.clip``); the server averages the clipped updates with a fixed
denominator ``m`` (the configured sample size: every client counts equally, whatever its data size)
and adds Gaussian noise of standard deviation ``z·C/m`` (``z`` = ``dp.noise_multiplier``) to that
mean. The private split never leaves a client, so it needs no noise: that is where partial
personalization gains over full-model DP. Formally (DP-FedAvg, McMahan et al. 2018)::

    Δ_i = clip(x_i − x, C)          (x_i: client i's shared reply, x: the shared parameters sent)
    Δ   = Σ_i Δ_i / m + N(0, (z·C/m)² I)
    x  ← the method's own step with Δ (FedAvg family: x + Δ; FedSim/FedAlt: the server optimizer
         on Δ; FFGG: the replies are updates already, x − γ·Δ)

The building blocks are Flower's (``flwr.supercore.differential_privacy`` in Flower 1.41, where
``flwr.common.differential_privacy`` moved): :func:`clip` is its ``clip_inputs_inplace`` (FlatClip),
the noise scale is its ``compute_stdv``. The noise itself is drawn from a ``numpy.random.Generator``
given by the caller (Flower's ``add_gaussian_noise_inplace`` draws from NumPy's global generator):
tests pass a seeded one; a run uses a fresh one from OS entropy, never ``cfg.seed`` (whoever knows
the seed could subtract the noise).

ε at ``dp.delta`` after ``r`` rounds comes from dp-accounting's RDP accountant (the one Flower's
``RdpAccountant`` wraps) for ``r`` compositions of the sampled Gaussian mechanism, with client
sampling rate ``q = m / N`` (``dp.sampling: poisson``, the DP-FedAvg convention; add-or-remove-one
client neighbours) or ``q = 1`` (``dp.sampling: none``: no amplification by sampling, valid even
when who took part in a round is public, as it is in ``results.json``). All rounds are the same
event, so ε is a function of the round alone (a resumed run reports the right ε without state).

Which methods accept ``dp.enabled``: a strategy declares it with the classmethod
``check_privacy(cfg)`` (``strategies/base.py``: accepted unless the class sets ``dp_refusal``, the
reason why not); a strategy that does not define it is refused (:func:`check`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np

from fedvit.errors import ConfigError

U = TypeVar("U")  # a strategy's update record (strategies.base.ClientUpdate)

SAMPLINGS = ("poisson", "none")
ACCOUNTANT = "rdp"  # dp-accounting's RdpAccountant, add-or-remove-one neighbouring clients


# --------------------------------------------------------------------------- mechanism


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all of ``update``'s arrays flattened together (Flower's ``get_norm``)."""
    from flwr.supercore.differential_privacy import get_norm

    return get_norm([np.asarray(a, dtype=np.float64) for a in update.values()]) if update else 0.0


def clip(update: Mapping[str, np.ndarray], clip_norm: float) -> dict[str, np.ndarray]:
    """``update`` (float64 copies) scaled by ``min(1, clip_norm / ‖update‖)``: its L2 norm over all
    arrays together is at most ``clip_norm`` (Flower's ``clip_inputs_inplace``)."""
    from flwr.supercore.differential_privacy import clip_inputs_inplace

    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    out = {k: np.array(v, dtype=np.float64) for k, v in update.items()}
    if update_norm(out) > 0:  # Flower divides by the norm: an all-zero update stays as it is
        clip_inputs_inplace(list(out.values()), clip_norm)
    return out


def noise_std(clip_norm: float, noise_multiplier: float, num_sampled: int) -> float:
    """Standard deviation of the noise on the mean of ``num_sampled`` clipped updates: z·C/m
    (Flower's ``compute_stdv``)."""
    from flwr.supercore.differential_privacy import compute_stdv

    return compute_stdv(noise_multiplier, clip_norm, num_sampled)


def noise(
    aggregate: Mapping[str, np.ndarray],
    clip_norm: float,
    noise_multiplier: float,
    num_sampled: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """``aggregate`` plus i.i.d. N(0, (z·C/m)²) on every element, drawn from ``rng`` (each array
    keeps its dtype)."""
    std = noise_std(clip_norm, noise_multiplier, num_sampled)
    return {
        k: (np.asarray(a, dtype=np.float64) + rng.normal(0.0, std, np.shape(a))).astype(np.asarray(a).dtype)
        for k, a in aggregate.items()
    }


# --------------------------------------------------------------------------- accounting


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting warns (through absl) about every fractional RDP order whose series does not
    converge for small sampling rates; those orders are excluded from the minimum, which only can
    make ε larger. One line per order and call would drown the round log."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _event(rounds: int, sampling_rate: float, noise_multiplier: float) -> Any:
    import dp_accounting as dpa

    gaussian = dpa.GaussianDpEvent(noise_multiplier)
    one = gaussian if sampling_rate >= 1 else dpa.PoissonSampledDpEvent(sampling_rate, gaussian)
    return dpa.SelfComposedDpEvent(one, rounds)


def _check_accounting(sampling_rate: float, noise_multiplier: float, delta: float) -> None:
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


@lru_cache(maxsize=4096)
def epsilon(rounds: int, sampling_rate: float, noise_multiplier: float, delta: float) -> float:
    """ε at ``delta`` after ``rounds`` releases of the sampled Gaussian mechanism (client sampling
    rate ``sampling_rate``, noise multiplier ``noise_multiplier``), from dp-accounting's RDP
    accountant with add-or-remove-one neighbouring clients. 0 before the first round."""
    import dp_accounting as dpa

    _check_accounting(sampling_rate, noise_multiplier, delta)
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if rounds == 0:
        return 0.0
    accountant = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    with _quiet_absl():
        accountant.compose(_event(rounds, sampling_rate, noise_multiplier))
        return float(accountant.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, rounds: int, sampling_rate: float, delta: float) -> float:
    """The smallest noise multiplier whose :func:`epsilon` after ``rounds`` is at most
    ``target_epsilon`` (dp-accounting's ``calibrate_dp_mechanism``)."""
    import dp_accounting as dpa

    _check_accounting(sampling_rate, 1.0, delta)
    if not target_epsilon > 0 or rounds < 1:
        raise ValueError(f"need target_epsilon > 0 and rounds >= 1, got {target_epsilon}, {rounds}")
    with _quiet_absl():
        z = dpa.calibrate_dp_mechanism(
            lambda: dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE),
            lambda z: _event(rounds, sampling_rate, z),
            target_epsilon,
            delta,
            bracket_interval=dpa.LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-4,
        )
    # the bisection returns the upper end of its last bracket: within budget by construction
    return float(z)


# --------------------------------------------------------------------------- a run's mechanism


def sample_size(num_clients: int, fraction_train: float, min_train_clients: int) -> int:
    """Clients a round samples when all ``num_clients`` are live (as
    ``PersonalizedStrategy.sample_nodes``): the fixed denominator m of the private mean."""
    return min(num_clients, max(min_train_clients, round(fraction_train * num_clients)))


@dataclass
class Release:
    """What one round's private aggregation released, for ``results.json``."""

    round: int
    epsilon: float
    clients: int  # updates in the mean
    clipped: int  # of those, how many were scaled down
    noise_std: float
    max_norm: float  # the largest update norm before clipping (server-side statistic, not released)

    def record(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "clients": self.clients,
            "clipped": self.clipped,
            "noise_std": self.noise_std,
        }


class SharedDP:
    """The private aggregation of a run's shared split: clip each client's update, average with
    the fixed denominator ``num_sampled``, add noise, and the ε so far.

    ``release(round, replies, current)`` is what a strategy calls instead of its own mean."""

    def __init__(
        self,
        *,
        clip_norm: float,
        noise_multiplier: float,
        delta: float,
        num_sampled: int,
        num_clients: int,
        sampling: str = "poisson",
        rng: np.random.Generator | None = None,
    ) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got '{sampling}'")
        if not 1 <= num_sampled <= num_clients:
            raise ValueError(f"num_sampled must be in [1, num_clients={num_clients}], got {num_sampled}")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.num_sampled = int(num_sampled)
        self.num_clients = int(num_clients)
        self.sampling = sampling
        self.sampling_rate = self.num_sampled / self.num_clients if sampling == "poisson" else 1.0
        _check_accounting(self.sampling_rate, self.noise_multiplier, self.delta)
        # OS entropy unless a test injects a generator: a seed in the config would make the noise public
        self.rng = rng if rng is not None else np.random.default_rng()

    @classmethod
    def from_config(cls, cfg: Any, rng: np.random.Generator | None = None) -> SharedDP | None:
        """The run's mechanism, or ``None`` when ``dp.enabled`` is false."""
        dp = cfg.dp
        if not dp.enabled:
            return None
        s, n = cfg.server, cfg.clients.num_clients
        m = sample_size(n, s.fraction_train, s.min_train_clients)
        return cls(
            clip_norm=dp.clip,
            noise_multiplier=resolved_noise_multiplier(cfg),
            delta=dp.delta,
            num_sampled=m,
            num_clients=n,
            sampling=dp.sampling,
            rng=rng,
        )

    def epsilon(self, rounds: int) -> float:
        """ε at ``delta`` after ``rounds`` rounds."""
        return epsilon(rounds, self.sampling_rate, self.noise_multiplier, self.delta)

    def describe(self) -> dict[str, Any]:
        """The mechanism, for ``results.json`` ``privacy``."""
        return {
            "clip": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "noise_std": noise_std(self.clip_norm, self.noise_multiplier, self.num_sampled),
            "delta": self.delta,
            "num_sampled": self.num_sampled,
            "num_clients": self.num_clients,
            "sampling": self.sampling,
            "sampling_rate": self.sampling_rate,
            "accountant": f"{ACCOUNTANT} (dp-accounting), add-or-remove-one client",
            "protects": "the shared split; the private split never leaves a client",
        }

    def release(
        self,
        server_round: int,
        replies: Sequence[Mapping[str, np.ndarray]],
        current: Mapping[str, np.ndarray] | None,
    ) -> tuple[dict[str, np.ndarray], Release]:
        """The private aggregate of one round.

        ``replies``: each client's shared arrays. ``current``: the shared arrays the clients were
        sent, when replies are parameters (the update is ``reply − current``, and the result is
        ``current`` + the noised mean update, in ``current``'s dtypes); ``None`` when replies are
        updates already (FFGG's gradients; the result is the noised mean update, float32)."""
        if not replies:
            raise ValueError(f"round {server_round}: no update to release")
        if len(replies) > self.num_sampled:
            raise ValueError(
                f"round {server_round}: {len(replies)} updates, more than the {self.num_sampled} sampled "
                "clients the noise is calibrated for"
            )
        keys = list(current if current is not None else replies[0])
        total = {k: np.zeros(np.shape(replies[0][k]), dtype=np.float64) for k in keys}
        clipped, max_norm = 0, 0.0
        for reply in replies:
            update = (
                {k: np.asarray(reply[k], dtype=np.float64) - np.asarray(current[k], np.float64) for k in keys}
                if current is not None
                else {k: reply[k] for k in keys}
            )
            norm = update_norm(update)
            max_norm = max(max_norm, norm)
            clipped += int(norm > self.clip_norm)
            for k, v in clip(update, self.clip_norm).items():
                total[k] += v
        mean = {k: v / self.num_sampled for k, v in total.items()}
        noised = noise(mean, self.clip_norm, self.noise_multiplier, self.num_sampled, self.rng)
        if current is not None:
            out = {
                k: (np.asarray(current[k], np.float64) + noised[k]).astype(np.asarray(current[k]).dtype)
                for k in keys
            }
        else:
            out = {k: v.astype(np.float32) for k, v in noised.items()}
        info = Release(
            round=server_round,
            epsilon=self.epsilon(server_round),
            clients=len(replies),
            clipped=clipped,
            noise_std=noise_std(self.clip_norm, self.noise_multiplier, self.num_sampled),
            max_norm=max_norm,
        )
        return out, info


# --------------------------------------------------------------------------- the strategy's calls


def privatize(
    dp: SharedDP | None,
    server_round: int,
    updates: list[U],
    current: Mapping[str, np.ndarray] | None,
    recorder: Any = None,
) -> list[U]:
    """What a strategy aggregates: ``updates`` as they are without DP; with DP one update that holds
    the private release (:meth:`SharedDP.release` of the updates' ``arrays``; ``current``: the shared
    arrays sent, or ``None`` when the replies are updates already) in place of all of them.

    ``updates`` are the strategy's update records (dataclasses with ``arrays``, ``num_examples``,
    ``client_id``, ``node_id``): the stand-in is the first one with the released arrays, one example
    and no client, so any weighted mean of the list is the release itself, and the method's own
    step (FedAvg's mean, the server optimizer, FFGG's x − γ·g) is applied to it. The round's
    :class:`Release` goes to ``recorder`` (``results.json`` ``rounds[i].train.privacy``; the
    mechanism in ``privacy``)."""
    if dp is None:
        return updates
    arrays, info = dp.release(server_round, [u.arrays for u in updates], current)
    if recorder is not None:
        recorder.data["privacy"] = dp.describe()
        record(recorder, info)
    return [replace(updates[0], client_id=-1, node_id=-1, arrays=arrays, num_examples=1)]  # type: ignore[type-var]


def record(recorder: Any, info: Release) -> None:
    """Put ``info`` in the results of its round (``rounds[i].train.privacy``)."""
    for entry in reversed(recorder.data.get("rounds", [])):
        if entry.get("round") == info.round:
            entry.setdefault("train", {})["privacy"] = info.record()
            return
    recorder.data.setdefault("rounds", []).append({"round": info.round, "train": {"privacy": info.record()}})


def train_metrics(dp: SharedDP | None, server_round: int) -> dict[str, float]:
    """What a round's training metrics add: ``epsilon`` so far (nothing without DP)."""
    return {} if dp is None else {"epsilon": dp.epsilon(server_round)}


def progress(dp: SharedDP | None, metrics: Mapping[str, Any] | None) -> str | None:
    """The progress line's privacy part, e.g. ``ε 3.44 (δ 1e-05)``; ``None`` without DP."""
    if dp is None or metrics is None or "epsilon" not in metrics:
        return None
    return f"ε {float(metrics['epsilon']):.3g} (δ {dp.delta:g})"


# --------------------------------------------------------------------------- configuration


def resolved_noise_multiplier(cfg: Any) -> float:
    """``dp.noise_multiplier``, or the one that reaches ``dp.target_epsilon`` after
    ``server.num_rounds`` rounds."""
    dp = cfg.dp
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    s, n = cfg.server, cfg.clients.num_clients
    q = sample_size(n, s.fraction_train, s.min_train_clients) / n if dp.sampling == "poisson" else 1.0
    return noise_for_epsilon(float(dp.target_epsilon), s.num_rounds, q, float(dp.delta))


def check(cfg: Any) -> None:
    """Raise :class:`ConfigError` when ``dp`` is impossible, or the method refuses DP."""
    dp = cfg.dp
    if not dp.enabled:
        return

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"key 'dp.{key}': {msg}")

    need(dp.clip > 0 and math.isfinite(dp.clip), "clip", f"must be > 0, got {dp.clip}")
    need(
        (dp.noise_multiplier is None) != (dp.target_epsilon is None),
        "noise_multiplier",
        "set exactly one of dp.noise_multiplier and dp.target_epsilon, got "
        f"{dp.noise_multiplier} and {dp.target_epsilon}",
    )
    if dp.noise_multiplier is not None:
        need(dp.noise_multiplier > 0, "noise_multiplier", f"must be > 0, got {dp.noise_multiplier}")
    else:
        need(dp.target_epsilon > 0, "target_epsilon", f"must be > 0, got {dp.target_epsilon}")
    n = cfg.clients.num_clients
    need(
        0 < dp.delta < 1 / n,
        "delta",
        f"must be in (0, 1/clients.num_clients = {1 / n:g}): a client-level guarantee with δ ≥ 1/N "
        f"allows releasing one client's data outright; got {dp.delta}",
    )
    need(dp.sampling in SAMPLINGS, "sampling", f"must be one of {SAMPLINGS}, got '{dp.sampling}'")
    from fedvit.registry import get_strategy

    strategy = get_strategy(cfg.method.strategy)
    declared = getattr(strategy, "check_privacy", None)
    if declared is None:
        raise ConfigError(
            f"method '{cfg.method.name}': dp.enabled, but strategy '{cfg.method.strategy}' "
            f"({strategy.__name__}) does not declare whether its aggregation supports differential "
            "privacy (a check_privacy classmethod)"
        )
    declared(cfg)
