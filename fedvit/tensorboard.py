"""TensorBoard event files of a run, in ``<run dir>/tb/`` (offline; ``tensorboard --logdir outputs/``).

:class:`fedvit.results.RunRecorder` writes one step per server round at the end of the round,
from the same record as ``results.json``, so the ServerApp (simulation and deployment), the
in-process grid and a resumed run all write them; ``output.tensorboard: false`` turns them off.

Tags (step = server round; accuracies are fractions):

* ``test_acc/<stat>``, ``val_acc/<stat>``, ``test_loss/<stat>``, ``val_loss/<stat>`` (and a method's
  further accuracies, e.g. ``test_acc_exit2/<stat>``), ``<stat>`` in mean (unweighted over clients),
  weighted_mean (by examples), std, min, q10, q50, q90, max: rounds where every client was evaluated.
  A round evaluated on a sample of the clients goes to ``<metric>_sampled/<stat>`` instead (its
  statistics are over another subset of clients each time, not comparable).
* ``clients/test_acc``, ``clients/val_acc``: histograms of the per-client accuracies.
* ``eval/clients_evaluated``, ``eval/clients_total``.
* ``train_loss/<stat>`` over the clients that trained, ``train/clients``.
* ``resources/round_s`` (seconds of the round; the first round of a run or of a resumed session
  includes the start-up), ``resources/elapsed_s`` (since the ServerApp started),
  ``resources/server_peak_rss_mb`` (peak resident memory of the process running the ServerApp:
  in simulation the server alone, in-process the clients too).

A resumed run appends a new event file whose ``purge_step`` is its first round: TensorBoard then
drops what an earlier session wrote from that round on (a round recorded before a crash but not
checkpointed is run again), so no step is shown twice.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

STATS = ("mean", "weighted_mean", "std", "min", "q10", "q50", "q90", "max")
SUBDIR = "tb"


def check_available() -> None:
    """Raise a clear error when the ``tensorboard`` package (needed by torch's writer) is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            f"output.tensorboard: cannot write event files ({err}); `pip install tensorboard` or set "
            "output.tensorboard=false"
        ) from err


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class TensorBoardLog:
    """The event files of one ServerApp session of a run (see the module docstring)."""

    def __init__(self, run_dir: Path, first_round: int | None = None) -> None:
        """``first_round``: the first round this session runs when it resumes a run (events of that
        round and later from earlier sessions are purged); None for a new run."""
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / SUBDIR
        self.writer = SummaryWriter(str(self.log_dir), purge_step=first_round)
        self._prev_elapsed: float | None = None

    def write_text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, 0)

    def write_round(self, entry: Mapping[str, Any]) -> None:
        """One round of ``results.json`` (``rounds[i]``)."""
        step = int(entry["round"])
        w = self.writer
        ev = entry.get("eval")
        if ev:
            suffix = "" if ev.get("mode", "full") == "full" else "_sampled"
            for key, summary in ev.items():
                if not isinstance(summary, Mapping) or not summary.get("n"):
                    continue  # per_client, or a metric no client reported
                for stat in STATS:
                    if summary.get(stat) is not None:
                        w.add_scalar(f"{key}{suffix}/{stat}", float(summary[stat]), step)
            per_client = ev.get("per_client") or {}
            for metric in ("test-acc", "val-acc"):
                values = [m[metric] for m in per_client.values() if m.get(metric) is not None]
                if values:
                    w.add_histogram(f"clients/{metric.replace('-', '_')}", np.asarray(values, float), step)
            w.add_scalar("eval/clients_evaluated", float(ev.get("clients_evaluated", len(per_client))), step)
            if ev.get("clients_total") is not None:
                w.add_scalar("eval/clients_total", float(ev["clients_total"]), step)
        train = entry.get("train")
        if train:
            for stat in STATS:
                if train["loss"].get(stat) is not None:
                    w.add_scalar(f"train_loss/{stat}", float(train["loss"][stat]), step)
            w.add_scalar("train/clients", float(len(train.get("clients", []))), step)
        elapsed = entry.get("elapsed_s")
        if elapsed is not None:
            since = self._prev_elapsed if self._prev_elapsed is not None else 0.0
            w.add_scalar("resources/round_s", float(elapsed) - since, step)
            w.add_scalar("resources/elapsed_s", float(elapsed), step)
            self._prev_elapsed = float(elapsed)
        w.add_scalar("resources/server_peak_rss_mb", _peak_rss_mb(), step)
        w.flush()  # current after every round, like results.json

    def close(self) -> None:
        self.writer.close()
