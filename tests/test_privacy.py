"""Client-level differential privacy of the shared split (fedvit.privacy, docs/privacy.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from fedvit import privacy
from fedvit.config import ConfigError, load_config
from fedvit.privacy import SharedDP


def updates(rng: np.random.Generator, scales: list[float]) -> list[dict[str, np.ndarray]]:
    """One two-array update per scale, with L2 norm ``scale`` over both arrays."""
    out = []
    for s in scales:
        u = {"w": rng.normal(size=(7, 5)), "b": rng.normal(size=3)}
        norm = math.sqrt(sum(float((a**2).sum()) for a in u.values()))
        out.append({k: (a * s / norm).astype(np.float32) for k, a in u.items()})
    return out


def norm(u: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float((np.asarray(a, np.float64) ** 2).sum()) for a in u.values()))


# --------------------------------------------------------------------------- clipping


def test_clip_bounds_the_norm_over_all_arrays_and_keeps_the_direction() -> None:
    rng = np.random.default_rng(0)
    for u in updates(rng, [0.3, 1.0, 2.5, 40.0]):
        c = privacy.clip(u, 1.0)
        assert norm(c) <= 1.0 + 1e-9
        factor = min(1.0, 1.0 / norm(u))  # one factor for every array: the direction is kept
        for k in u:
            np.testing.assert_allclose(c[k], u[k].astype(np.float64) * factor, rtol=1e-6)


def test_clip_keeps_an_all_zero_update_and_refuses_a_bad_bound() -> None:
    zero = {"w": np.zeros((2, 2), np.float32)}
    np.testing.assert_array_equal(privacy.clip(zero, 1.0)["w"], 0.0)
    with pytest.raises(ValueError, match="clip_norm"):
        privacy.clip(zero, 0.0)


def test_release_bounds_every_clients_shared_update() -> None:
    """With (almost) no noise, the released change is the mean of the clipped updates: one client
    with a huge update moves the shared part by at most C / m."""
    rng = np.random.default_rng(1)
    current = {"w": rng.normal(size=(7, 5)).astype(np.float32), "b": np.zeros(3, np.float32)}
    deltas = updates(rng, [0.2, 0.5, 1e6])
    replies = [{k: current[k] + d[k] for k in current} for d in deltas]
    dp = SharedDP(clip_norm=1.0, noise_multiplier=1e-9, delta=1e-5, num_sampled=4, num_clients=10, rng=rng)
    out, info = dp.release(3, replies, current)
    change = {k: out[k].astype(np.float64) - current[k] for k in current}
    expected = {
        k: sum(privacy.clip(d, 1.0)[k] for d in deltas) / 4
        for k in current  # fixed denominator m = 4
    }
    for k in current:
        np.testing.assert_allclose(change[k], expected[k], atol=1e-5)
        assert out[k].dtype == current[k].dtype
    assert norm(change) <= (0.2 + 0.5 + 1.0) / 4 + 1e-5
    assert (info.clients, info.clipped, info.round) == (3, 1, 3)
    assert info.epsilon == pytest.approx(privacy.epsilon(3, 0.4, 1e-9, 1e-5))


def test_release_of_updates_without_reference_is_the_noised_mean_of_clipped_updates() -> None:
    """FFGG's replies are gradients: the release is their clipped mean (plus noise), not a model."""
    rng = np.random.default_rng(2)
    grads = updates(rng, [3.0, 0.5])
    dp = SharedDP(clip_norm=1.0, noise_multiplier=1e-9, delta=1e-5, num_sampled=2, num_clients=2, rng=rng)
    out, info = dp.release(1, grads, None)
    for k in grads[0]:
        np.testing.assert_allclose(out[k], (privacy.clip(grads[0], 1.0)[k] + grads[1][k]) / 2, atol=1e-6)
    assert info.clipped == 1


def test_release_refuses_more_updates_than_the_noise_is_calibrated_for() -> None:
    dp = SharedDP(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, num_sampled=2, num_clients=5)
    u = {"w": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match="more than the 2 sampled"):
        dp.release(1, [u, u, u], u)


# --------------------------------------------------------------------------- noise


def test_noise_std_is_noise_multiplier_times_clip_over_sampled_clients() -> None:
    rng = np.random.default_rng(3)
    zeros = {"a": np.zeros((400, 500), np.float32), "b": np.zeros(100_000, np.float32)}
    z, c, m = 1.3, 0.5, 4
    noised = privacy.noise(zeros, c, z, m, rng)
    sample = np.concatenate([noised["a"].ravel(), noised["b"].ravel()]).astype(np.float64)
    want = z * c / m
    # 300k draws: the sample std is within 1% of sigma (its relative standard error is 0.13%)
    assert sample.std() == pytest.approx(want, rel=0.01)
    assert abs(sample.mean()) < 5 * want / math.sqrt(sample.size)
    assert noised["a"].dtype == np.float32
    # the same draws again from the same seed; different ones from another
    again = privacy.noise(zeros, c, z, m, np.random.default_rng(3))
    np.testing.assert_array_equal(again["a"], noised["a"])
    assert not np.array_equal(privacy.noise(zeros, c, z, m, np.random.default_rng(4))["a"], noised["a"])


def test_release_adds_the_noise_to_the_mean_update() -> None:
    """All clients send back what they got: the released change is pure noise of std z·C/m."""
    rng = np.random.default_rng(5)
    current = {"w": np.full((300, 300), 0.25, np.float32)}
    dp = SharedDP(clip_norm=2.0, noise_multiplier=0.8, delta=1e-5, num_sampled=5, num_clients=20, rng=rng)
    out, info = dp.release(1, [current] * 5, current)
    change = out["w"].astype(np.float64) - 0.25
    assert change.std() == pytest.approx(0.8 * 2.0 / 5, rel=0.02)
    assert info.noise_std == pytest.approx(0.8 * 2.0 / 5)
    assert info.clipped == 0


def test_default_generator_is_not_reproducible() -> None:
    """Without an injected generator the noise comes from OS entropy (never from cfg.seed)."""
    u = {"w": np.zeros(1000, np.float32)}
    draws = [
        SharedDP(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, num_sampled=1, num_clients=2).release(
            1, [u], u
        )[0]["w"]
        for _ in range(2)
    ]
    assert not np.array_equal(draws[0], draws[1])


# --------------------------------------------------------------------------- accounting


def test_epsilon_decreases_with_noise_and_grows_with_rounds() -> None:
    eps = {(z, t): privacy.epsilon(t, 0.1, z, 1e-5) for z in (0.8, 1.0, 2.0, 4.0) for t in (1, 10, 100)}
    for t in (1, 10, 100):
        assert eps[(0.8, t)] > eps[(1.0, t)] > eps[(2.0, t)] > eps[(4.0, t)] > 0
    for z in (0.8, 1.0, 2.0, 4.0):
        assert eps[(z, 1)] < eps[(z, 10)] < eps[(z, 100)]
    assert privacy.epsilon(0, 0.1, 1.0, 1e-5) == 0.0
    # amplification by sampling: fewer clients per round, less privacy spent
    assert privacy.epsilon(10, 0.05, 1.0, 1e-5) < privacy.epsilon(10, 0.5, 1.0, 1e-5)


def test_epsilon_matches_flowers_rdp_accountant() -> None:
    """100 clients, 10 per round (Poisson), z = 1, 100 rounds, δ = 1e-5: the same ε as Flower's own
    accountant (flwr.supercore.privacy_accounting, its wrapper of dp-accounting) after 100 releases."""
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    flower = RdpAccountant(
        PrivacyConfig(
            target_delta=1e-5,
            population_size=100,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.POISSON,
        )
    )
    flower.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=10, population_size=100), 100)
    assert privacy.epsilon(100, 0.1, 1.0, 1e-5) == pytest.approx(flower.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 1), (2.0, 10), (5.0, 100)])
def test_epsilon_without_sampling_bounds_the_exact_gaussian_epsilon(z: float, rounds: int) -> None:
    """Without sampling, r rounds of the Gaussian mechanism are one Gaussian mechanism with noise
    multiplier z/√r, whose exact ε (Balle & Wang 2018, dp-accounting's get_epsilon_gaussian) the RDP
    bound must not undercut, and meets within 10%."""
    import dp_accounting

    exact = dp_accounting.get_epsilon_gaussian(z / math.sqrt(rounds), 1e-5)
    rdp = privacy.epsilon(rounds, 1.0, z, 1e-5)
    assert exact <= rdp <= 1.1 * exact


def test_noise_for_epsilon_is_the_smallest_noise_within_the_budget() -> None:
    z = privacy.noise_for_epsilon(3.0, 50, 0.25, 1e-5)
    assert privacy.epsilon(50, 0.25, z, 1e-5) <= 3.0
    assert privacy.epsilon(50, 0.25, 0.99 * z, 1e-5) > 3.0


# --------------------------------------------------------------------------- the strategy's calls


@dataclass
class Update:
    """The shape of a strategy's update record (strategies.base.ClientUpdate)."""

    client_id: int
    node_id: int
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict = field(default_factory=dict)


class Recorder:
    def __init__(self) -> None:
        self.data: dict = {"rounds": [{"round": 2, "train": {"clients": [0, 1]}}]}


def test_privatize_hands_the_strategy_one_update_holding_the_release() -> None:
    rng = np.random.default_rng(6)
    current = {"w": np.zeros(4, np.float32)}
    ups = [
        Update(0, 11, {"w": np.full(4, 3.0, np.float32)}, 500, {"num-steps": 8}),
        Update(1, 12, {"w": np.full(4, 0.1, np.float32)}, 20, {"num-steps": 1}),
    ]
    dp = SharedDP(clip_norm=1.0, noise_multiplier=1e-9, delta=1e-5, num_sampled=2, num_clients=4, rng=rng)
    recorder = Recorder()
    (one,) = privacy.privatize(dp, 2, ups, current, recorder)
    # equal weights, each update clipped to norm 1 (the first one: 6 -> 1), fixed denominator 2
    np.testing.assert_allclose(one.arrays["w"], (np.full(4, 0.5) + np.full(4, 0.1)) / 2, atol=1e-6)
    assert (one.client_id, one.node_id, one.num_examples, one.metrics) == (-1, -1, 1, {"num-steps": 8})
    assert recorder.data["privacy"] == dp.describe()
    assert recorder.data["privacy"]["sampling_rate"] == 0.5
    entry = recorder.data["rounds"][0]["train"]
    assert entry["clients"] == [0, 1]
    assert entry["privacy"] == {
        "epsilon": pytest.approx(privacy.epsilon(2, 0.5, 1e-9, 1e-5)),
        "clients": 2,
        "clipped": 1,
        "noise_std": pytest.approx(1e-9 / 2),
    }
    assert privacy.privatize(None, 2, ups, current) is ups  # without DP: untouched


def test_epsilon_in_the_round_metrics_and_the_progress_line() -> None:
    dp = SharedDP(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, num_sampled=1, num_clients=10)
    metrics = privacy.train_metrics(dp, 10)
    assert metrics == {"epsilon": pytest.approx(privacy.epsilon(10, 0.1, 1.0, 1e-5))}
    assert privacy.progress(dp, metrics) == f"ε {metrics['epsilon']:.3g} (δ 1e-05)"
    assert privacy.train_metrics(None, 10) == {}
    assert privacy.progress(None, metrics) is None


# --------------------------------------------------------------------------- configuration


def rc(**overrides: str) -> dict:
    extra = " ".join(f"dp.{k}={v}" for k, v in overrides.items())
    return {"method": "fedavg", "num-clients": 10, "overrides": f"dp.enabled=true {extra}"}


def test_dp_is_off_by_default() -> None:
    cfg = load_config({"method": "fedavg"})
    assert cfg.dp.enabled is False
    assert SharedDP.from_config(cfg) is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"noise_multiplier": "1.0", "clip": "0"}, "dp.clip"),
        ({}, "exactly one of dp.noise_multiplier and dp.target_epsilon"),
        ({"noise_multiplier": "1.0", "target_epsilon": "3"}, "exactly one"),
        ({"noise_multiplier": "-1"}, "dp.noise_multiplier"),
        ({"target_epsilon": "0"}, "dp.target_epsilon"),
        ({"noise_multiplier": "1.0", "delta": "0.1"}, r"dp.delta.*1/clients.num_clients"),
        ({"noise_multiplier": "1.0", "sampling": "shuffle"}, "dp.sampling"),
    ],
)
def test_impossible_dp_settings_name_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(rc(**overrides))


def test_target_epsilon_sets_the_noise_for_the_runs_rounds_and_sampling() -> None:
    from fedvit.config import FedvitConfig

    cfg = FedvitConfig()
    cfg.clients.num_clients, cfg.server.num_rounds, cfg.server.fraction_train = 20, 30, 0.25
    cfg.dp.enabled, cfg.dp.target_epsilon, cfg.dp.delta = True, 3.0, 1e-4
    dp = SharedDP.from_config(cfg)
    assert (dp.num_sampled, dp.sampling_rate) == (5, 0.25)
    assert dp.noise_multiplier == pytest.approx(privacy.noise_for_epsilon(3.0, 30, 0.25, 1e-4))
    assert dp.epsilon(30) <= 3.0 < dp.epsilon(31)
    cfg.dp.sampling = "none"  # no amplification: more noise for the same budget
    assert SharedDP.from_config(cfg).noise_multiplier > dp.noise_multiplier


# --------------------------------------------------------------------------- secure aggregation
# What docs/privacy.md states about Flower 1.41's SecAgg+, run in-process (no Ray): the protocol
# works for the legacy Strategy API (FitIns / FitRes), not for the Message-API strategies and the
# `@app.train()` replies fedvit uses. If Flower changes this, these tests fail: update the doc.

SECAGG_CLIENTS = 4


def secagg_grid(client_app):
    """An in-process grid of 4 nodes for ``client_app``. Flower serializes every message; in process
    a mod that pops a key from a ConfigRecord the server shares between messages (SecAgg+'s
    ``stage``) would change the next node's message, so each node gets a copy."""
    import copy
    import types

    from fedvit.inprocess import InProcessGrid

    grid = InProcessGrid({}, SECAGG_CLIENTS, client_app=lambda m, c: client_app(copy.deepcopy(m), c))
    grid.run = types.SimpleNamespace(run_id=1)  # the legacy client manager reads the run id
    errors: list[str] = []
    send = grid.send_and_receive

    def send_and_receive(messages, timeout=None):
        replies = list(send(messages, timeout=timeout))
        errors.extend(r.error.reason for r in replies if r.has_error())
        return replies

    grid.send_and_receive = send_and_receive
    return grid, errors


def legacy_secagg_round(client_app) -> tuple[np.ndarray, list[str]]:
    """One SecAgg+ round (DefaultWorkflow + SecAggPlusWorkflow, legacy FedAvg) from zeros: the new
    global array and the nodes' errors. Node i sends the array [i+1, i+1, i+1]."""
    import flwr
    from flwr.app import Context, RecordDict
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    grid, errors = secagg_grid(client_app)
    strategy = LegacyFedAvg(
        initial_parameters=flwr.common.ndarrays_to_parameters([np.zeros(3, np.float32)]),
        min_available_clients=SECAGG_CLIENTS,
        fraction_evaluate=0.0,
    )
    context = LegacyContext(
        context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
    )
    workflow = SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2, timeout=30)
    DefaultWorkflow(fit_workflow=workflow)(grid, context)
    (result,) = context.state.array_records["parameters"].to_numpy_ndarrays()
    return result, errors


def node_value(context) -> float:
    return float(context.node_config["partition-id"] + 1)


def test_secaggplus_sums_legacy_numpyclient_updates_in_process() -> None:
    """The documented combination works: client_fn + NumPyClient behind secaggplus_mod, a legacy
    strategy in SecAggPlusWorkflow. The server gets the mean (2.5) up to SecAgg+'s quantization."""
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp

    class Client(NumPyClient):
        def __init__(self, value: float) -> None:
            self.value = value

        def fit(self, parameters, config):
            return [np.full(3, self.value, np.float32)], 1, {}

    app = ClientApp(client_fn=lambda ctx: Client(node_value(ctx)).to_client(), mods=[secaggplus_mod])
    result, errors = legacy_secagg_round(app)
    assert errors == []
    np.testing.assert_allclose(result, 2.5, atol=0.01)


def test_secaggplus_does_not_take_message_api_train_replies() -> None:
    """A Message-API ``@app.train()`` reply ('arrays' + 'metrics' records, as fedvit's ClientApp sends)
    behind secaggplus_mod: the mod converts the reply with ``recorddict_to_fitres`` and fails on
    every node; the workflow halts and the round leaves the parameters as they were."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp

    app = ClientApp(mods=[secaggplus_mod])

    @app.train()
    def train(msg: Message, context) -> Message:
        content = RecordDict(
            {
                "arrays": ArrayRecord([np.full(3, node_value(context), np.float32)]),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        )
        return Message(content=content, reply_to=msg)

    result, errors = legacy_secagg_round(app)
    assert len(errors) == SECAGG_CLIENTS
    assert all("KeyError: 'fitres.parameters'" in e for e in errors)
    np.testing.assert_array_equal(result, 0.0)


def test_secaggplus_workflow_needs_a_legacy_context_and_strategy() -> None:
    """The server side: SecAggPlusWorkflow takes a LegacyContext (not the Context a Message-API
    ServerApp gets) and drives ``context.strategy.configure_fit`` / ``aggregate_fit``, which a
    ``flwr.serverapp.strategy`` strategy (fedvit's base class) does not have."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey
    from flwr.serverapp.strategy import FedAvg

    grid, _ = secagg_grid(ClientApp())
    workflow = SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2, timeout=30)

    def server_context() -> Context:
        return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})

    with pytest.raises(TypeError, match="Expect a LegacyContext, but get Context"):
        workflow(grid, server_context())
    context = LegacyContext(context=server_context(), config=ServerConfig(num_rounds=1), strategy=FedAvg())
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord([np.zeros(3, np.float32)])
    with pytest.raises(AttributeError, match="'FedAvg' object has no attribute 'configure_fit'"):
        workflow(grid, context)


# --------------------------------------------------------------------------- the strategies
# Which methods take dp.enabled (the strategy's check_privacy / dp_refusal), and DP in a real round.


@pytest.mark.parametrize(
    ("method", "extra", "reason"),
    [
        ("fedtp", "", "generates each client's own Q/K/V"),
        ("fedtp-per", "", "generates each client's own Q/K/V"),
        ("pfedla", "", r"its own aggregate θ̄_i"),
        ("heurpfedla", "", r"its own aggregate θ̄_i"),
        ("anytime", "model.anytime.enabled=true", "averaged over the clients whose tier holds it"),
        ("ffgg-async", "", "no rounds"),
        ("ffgg", "method.options.aggregator=median", "needs method.options.aggregator 'mean'"),
    ],
)
def test_methods_without_one_aggregate_refuse_dp_and_say_why(method: str, extra: str, reason: str) -> None:
    run_config = {
        "method": method,
        "num-clients": 10,
        "overrides": f"dp.enabled=true dp.noise_multiplier=1.0 {extra}",
    }
    with pytest.raises(ConfigError, match=rf"method '{method}': dp.enabled .*{reason}"):
        load_config(run_config)


ACCEPTING = ["fedavg", "fedper", "fedbn", "fedrep", "apfl", "fedperfix", "fedsim", "fedalt", "ffgg"]
ACCEPTING += ["local-ffgg", "perfedavg", "vanilla-prefix", "fedtp-vanilla", "local"]


@pytest.mark.parametrize("method", ACCEPTING)
def test_methods_that_aggregate_shared_updates_accept_dp(method: str) -> None:
    overrides = "dp.enabled=true dp.noise_multiplier=1.0"
    cfg = load_config({"method": method, "num-clients": 10, "overrides": overrides})
    assert cfg.dp.enabled


def test_a_strategy_that_replaces_the_round_is_refused() -> None:
    from strategies.base import PersonalizedStrategy

    class OwnRound(PersonalizedStrategy):
        def aggregate_train(self, plan, replies):  # the release would never be made
            raise NotImplementedError

    cfg = load_config({"method": "fedavg", "num-clients": 10})
    with pytest.raises(ConfigError, match="OwnRound overrides aggregate_train"):
        OwnRound.check_privacy(cfg)


TINY = "model.depth=2 model.embed_dim=32 model.num_heads=2 train.batch_size=64"
ALMOST_NO_NOISE = "dp.clip=0.001 dp.noise_multiplier=1e-9 dp.delta=1e-3"


def dp_run(tmp_path, method: str, rounds: int, dp: str, caplog=None):
    import logging

    import fedhelpers

    rc = fedhelpers.run_config(tmp_path, method, TINY, rounds, f"dp.enabled=true {dp}")
    if caplog is not None:
        caplog.set_level(logging.INFO)
    return rc, *fedhelpers.federate(rc)


def initial_shared(rc: dict) -> dict[str, np.ndarray]:
    from fedvit.models import build_model
    from fedvit.params import ParameterSplit, get_arrays

    cfg = load_config(rc)
    model = build_model(cfg)
    return get_arrays(model, ParameterSplit.from_model(model, cfg.method.private).shared)


@pytest.mark.slow
def test_fedper_with_dp_moves_the_shared_part_by_at_most_the_clip_and_reports_epsilon(
    tmp_path, caplog
) -> None:
    """3 clients, all every round, C = 1e-3, (almost) no noise: every round moves the shared part by at
    most C (the mean of 3 clipped updates), however far local training went; ε per round."""
    rc, _, results, run_dir = dp_run(tmp_path, "fedper", 2, ALMOST_NO_NOISE, caplog)
    start = initial_shared(rc)
    with np.load(run_dir / "checkpoint" / "arrays.npz") as z:
        after = {k: z[k] for k in z.files}
    assert set(after) == set(start)
    assert norm({k: after[k].astype(np.float64) - start[k] for k in start}) <= 2 * 0.001 * (1 + 1e-3)
    privacy_info = results["privacy"]
    assert privacy_info["num_sampled"] == 3 and privacy_info["sampling_rate"] == 1.0
    eps = [r["train"]["privacy"]["epsilon"] for r in results["rounds"]]
    assert eps == [pytest.approx(privacy.epsilon(r, 1.0, 1e-9, 1e-3)) for r in (1, 2)]
    assert all(r["train"]["privacy"]["clipped"] == 3 for r in results["rounds"])  # every update was larger
    lines = [m for m in caplog.messages if m.startswith("[fedvit] round ")]
    assert len(lines) == 2 and all("ε " in line and "(δ 0.001)" in line for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedsim", "ffgg"])
def test_server_optimizer_and_ffgg_step_along_the_private_release(tmp_path, method: str) -> None:
    """FedSim's optimizer and FFGG's x − γ·g take the clipped mean: with C = 1e-3 and server lr 1 one
    round moves the shared part by at most C."""
    rc, _, results, run_dir = dp_run(tmp_path, method, 1, ALMOST_NO_NOISE)
    start = initial_shared(rc)
    with np.load(run_dir / "checkpoint" / "arrays.npz") as z:
        change = {k: z[k].astype(np.float64) - start[k] for k in start}
    assert 0 < norm(change) <= 0.001 * (1 + 1e-3)
    assert results["rounds"][0]["train"]["privacy"]["clients"] == 3
