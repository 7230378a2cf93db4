"""Asynchronous FFGG: the server never waits for a round.

It keeps up to ``concurrency`` clients busy. Whenever a client's reply arrives (Flower's
``push_messages`` / ``pull_messages``), the server applies it and at once hands that client new
work with the newest x. An update computed on the model of version v_sent and applied at
version v has **staleness** s = v − v_sent and weight ``w = (1 + s) ** -staleness_exponent``:

* ``mode: immediate``: x ← x − γ · w · g for each update as it arrives (one server step each);
* ``mode: buffer`` (FedBuff-style): updates (times their weight) collect in a buffer of
  ``buffer_size``; when full, x ← x − γ · Agg(buffer) (the configured aggregator) and the
  buffer empties.

Every applied update is logged with its client, staleness, weight and model version in
``results.json`` (``async_updates``). ``updates_per_round`` applied updates (default: the
number of clients) make one "round" for evaluation, results and checkpoints; the run ends
after ``server.num_rounds`` such rounds. In-flight work is not checkpointed: a resumed run
starts handing out fresh work.

Simulated device speeds: ``speed_tiers`` lists slowdown factors assigned to clients in turn
(client i gets ``speed_tiers[i % len]``) and sent as ``slowdown`` in the train config; a
client then takes ``slowdown`` × its real training time (the ClientApp waits), so staleness is
real in Flower's simulation; the in-process grid uses a virtual clock instead.

What crosses the wire per message is FFGG's (``clients/ffgg.py``): x down, a gradient or a
local change of x up; private parts never leave the clients.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from fedvit.params import UpdateError
from fedvit.registry import option_error, register_strategy
from fedvit.wire import to_numpy, to_record
from strategies.ffgg import FFGGStrategy
from strategies.rounds import ClientUpdate, RoundFailedError, RoundPlan, Run

MODES = ("immediate", "buffer")


@register_strategy("ffgg-async")
class AsyncFFGGStrategy(FFGGStrategy):
    """FFGG with asynchronous, staleness-weighted (or buffered) application of updates."""

    dp_refusal = (
        "there are no rounds: every update is applied on its own as it arrives, while the privacy "
        "accounting counts rounds of sampled clients"
    )

    @dataclass
    class Options(FFGGStrategy.Options):
        concurrency: int = 4  # C: clients busy at once
        mode: str = "immediate"  # immediate | buffer
        staleness_exponent: float = 0.5  # a in (1 + s)^-a
        buffer_size: int = 4  # K (mode: buffer)
        updates_per_round: int | None = None  # None: clients.num_clients
        speed_tiers: list[float] = field(default_factory=lambda: [1.0])

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.concurrency < 1:
                raise option_error("concurrency", f"must be >= 1, got {self.concurrency}")
            if self.mode not in MODES:
                raise option_error("mode", f"must be one of {MODES}, got '{self.mode}'")
            if self.staleness_exponent < 0:
                raise option_error("staleness_exponent", f"must be >= 0, got {self.staleness_exponent}")
            if self.buffer_size < 1:
                raise option_error("buffer_size", f"must be >= 1, got {self.buffer_size}")
            if self.updates_per_round is not None and self.updates_per_round < 1:
                raise option_error("updates_per_round", f"must be >= 1, got {self.updates_per_round}")
            if not self.speed_tiers or any(not s >= 1.0 for s in self.speed_tiers):
                raise option_error("speed_tiers", f"must be slowdown factors >= 1, got {self.speed_tiers}")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.version = 0  # server model version (one per server step)
        self.applied = 0  # updates applied so far
        self.buffer: list[tuple[dict[str, np.ndarray], float]] = []
        self.log: list[dict[str, Any]] = []

    def slowdown(self, client_id: int) -> float:
        tiers = self.options.speed_tiers
        return float(tiers[client_id % len(tiers)])

    def staleness_weight(self, staleness: int) -> float:
        return float((1.0 + staleness) ** -self.options.staleness_exponent)

    def client_config(self, server_round: int, client_id: int, config: ConfigRecord) -> ConfigRecord:
        out = super().client_config(server_round, client_id, config)
        out["slowdown"] = self.slowdown(client_id)
        out["model-version"] = self.version
        return out

    # ------------------------------------------------------------------ applying updates

    def apply(
        self, x: dict[str, np.ndarray], update: ClientUpdate, sent_version: int
    ) -> dict[str, np.ndarray]:
        """Apply one arrived update computed on model version ``sent_version`` (immediately or
        through the buffer); returns the new x and logs the update."""
        o = self.options
        staleness = self.version - sent_version
        w = self.staleness_weight(staleness)
        self.applied += 1
        entry = {
            "update": self.applied,
            "client": update.client_id,
            "version_sent": sent_version,
            "staleness": staleness,
            "weight": w,
            "version_applied": self.version,
        }
        if o.mode == "immediate":
            x = {
                k: (v.astype(np.float64) - o.server_lr * w * update.arrays[k]).astype(v.dtype)
                for k, v in x.items()
            }
            self.version += 1
        else:
            self.buffer.append(({k: update.arrays[k] for k in x}, w))
            if len(self.buffer) >= o.buffer_size:
                weighted = [{k: w_ * g[k].astype(np.float64) for k in g} for g, w_ in self.buffer]
                x = self.robust_step(x, weighted)
                self.buffer = []
                self.version += 1
                entry["flushed"] = True
        entry["version_after"] = self.version
        self.log.append(entry)
        return x

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, state = super().state_dict()
        arrays = {
            **arrays,
            **{f"buffer.{i}.{k}": v for i, (g, _) in enumerate(self.buffer) for k, v in g.items()},
        }
        state = {
            **state,
            "version": self.version,
            "applied": self.applied,
            "buffer_weights": [w for _, w in self.buffer],
        }
        return arrays, state

    def load_state_dict(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in arrays.items() if not k.startswith("buffer.")}, state)
        self.version = int(state.get("version", 0))
        self.applied = int(state.get("applied", 0))
        weights = [float(w) for w in state.get("buffer_weights", [])]
        self.buffer = [
            ({k: arrays[f"buffer.{i}.{k}"] for k in self.shared_shapes}, w) for i, w in enumerate(weights)
        ]

    # ------------------------------------------------------------------ the loop

    def run_rounds(self, run: Run, arrays: ArrayRecord, start_round: int) -> Result:
        """Hand out work and apply replies as they come until ``num_rounds`` rounds of
        ``updates_per_round`` updates each are applied."""
        grid, timeout = run.grid, run.timeout
        num_rounds = self.num_rounds
        per_round = self.options.updates_per_round or self.num_clients
        result = Result()
        x = to_numpy(arrays)
        if self.recorder is not None:
            self.log = self.recorder.data.setdefault("async_updates", [])  # kept across a resume
        rng = random.Random(self.seed * 1_000_033 + start_round)
        in_flight: dict[int, tuple[str, int, RoundPlan]] = {}  # address -> (message id, version, plan)
        idle = [n for n in self._live_nodes(grid)]
        rng.shuffle(idle)
        rnd, t0, round_updates, round_losses = start_round, time.time(), {}, []
        rejected: dict[str, str] = {}
        failures: list[str] = []
        deadline = time.time() + timeout

        def hand_out() -> None:
            while idle and len(in_flight) < self.options.concurrency:
                node = idle.pop(0)
                # a plan of one message: it is applied on its own whenever its reply comes
                messages, plan = self.plan_messages(
                    MessageType.TRAIN, rnd, [node], to_record(x), run.train_config, 1
                )
                ((mid, _),) = self.push(grid, messages).items()
                in_flight[node] = (mid, self.version, plan)

        hand_out()
        while rnd <= num_rounds:
            if not in_flight:
                raise RoundFailedError(f"round {rnd}: no client left to train; " + "; ".join(failures[:3]))
            replies = self.pull(grid, self._awaited(in_flight))
            if not replies:
                if time.time() > deadline:
                    raise TimeoutError(f"round {rnd}: no reply within server.round_timeout={timeout}s")
                time.sleep(0.05)
                continue
            deadline = time.time() + timeout
            for reply in replies:
                node = reply.metadata.src_node_id
                if node not in in_flight:
                    continue
                _, sent_version, plan = in_flight.pop(node)
                cid = self.node_to_client.get(node, -1)
                if reply.has_error():
                    failures.append(f"client {cid} (node {node}): {reply.error.reason}")
                    log(WARNING, "client %d failed: %s", cid, reply.error.reason)
                    continue  # a failing client gets no new work
                try:
                    update = self.parse_update(reply, plan)
                except (UpdateError, KeyError, TypeError, ValueError) as err:
                    rejected[str(cid)] = str(err)
                    log(WARNING, "Rejected update of client %d: %s", cid, err)
                    idle.append(node)
                    continue
                x = self.apply(x, update, sent_version)
                self.log[-1]["round"] = rnd
                round_updates[cid] = {k: v for k, v in update.metrics.items() if k != "client-id"}
                round_losses.append(float(update.metrics.get("train-loss", float("nan"))))
                idle.append(node)
                if self.applied % per_round == 0:
                    if self.recorder is not None:
                        self.recorder.record_train(rnd, round_updates, rejected, failures)
                    x_record = self._finish(rnd, x, run, result, round_losses, t0)
                    result.arrays = x_record
                    rnd, t0, round_updates, round_losses = rnd + 1, time.time(), {}, []
                    rejected, failures = {}, []
                    if rnd > num_rounds:
                        break
            if rnd <= num_rounds:
                hand_out()
        self._drain(grid, in_flight)
        result.arrays = to_record(x)
        return result

    def _finish(
        self, rnd: int, x: dict[str, np.ndarray], run: Run, result: Result, losses: list[float], t0: float
    ) -> ArrayRecord:
        """Close a round of ``updates_per_round`` updates: metrics, evaluation, checkpoint."""
        arrays = to_record(x)
        loss = float(np.nanmean(losses)) if losses and not np.isnan(losses).all() else float("nan")
        train = MetricRecord({"train-loss": loss, "num-clients": len(losses)})
        result.train_metrics_clientapp[rnd] = train
        stale = [e["staleness"] for e in self.log if e.get("round") == rnd]
        log(
            INFO,
            "[fedvit] async round %d: %d updates, staleness mean %.2f max %d, model version %d",
            rnd,
            len(stale),
            float(np.mean(stale)) if stale else 0.0,
            max(stale, default=0),
            self.version,
        )
        pending = self.open_round(rnd, arrays, run.evaluate_config, run.grid, train)
        self.close_round(pending, self.evaluate_now(pending, run), result, t0)
        return arrays

    @staticmethod
    def _awaited(in_flight: dict[int, tuple[str, int, RoundPlan]]) -> dict[str, int]:
        """Message id -> client address of the messages in flight (what :meth:`pull` needs)."""
        return {mid: address for address, (mid, _, _) in in_flight.items()}

    def _drain(
        self, grid: Grid, in_flight: dict[int, tuple[str, int, RoundPlan]], wait: float = 30.0
    ) -> None:
        """Collect (and discard) replies still in flight, so no client is cut off mid-message."""
        end = time.time() + wait
        while in_flight and time.time() < end:
            for reply in self.pull(grid, self._awaited(in_flight)):
                in_flight.pop(reply.metadata.src_node_id, None)
            if in_flight:
                time.sleep(0.05)
