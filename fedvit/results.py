"""A run's outputs: ``outputs/<run>/`` with config, results, metrics and plots.

Files (schema in ``docs/results.md``):

* ``config.yaml``: the resolved configuration.
* ``results.json``: rewritten atomically after every round; ``status`` is ``running`` until
  the last round, then ``completed``. Per-client metrics of every evaluated round (marked
  ``full`` or ``sampled``), their summary statistics, the evaluation protocol, the resource
  counts and the final summary (chosen among full-evaluation rounds).
* ``metrics.csv``: one row per round (summary statistics; ``eval_mode`` full | sampled).
* ``clients.csv``: one row per (round, client).
* ``accuracy.png`` (mean client accuracy per round), ``clients.png`` (per-client accuracy
  distribution at the last evaluated round and over rounds).
* ``checkpoint/``: the server's state after the last finished round (see strategies.base).
* ``tb/``: TensorBoard event files, one step per round (:mod:`fedvit.tensorboard`;
  ``output.tensorboard``).
"""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fedvit.evaluation import eval_mode, summarize
from fedvit.io import write_text

SCHEMA = "fedvit.results/1"
EVAL_METRICS = ("test-acc", "test-loss", "val-acc", "val-loss")


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` atomically (:func:`fedvit.io.write_text`), readable by its owner alone
    and without ``fsync``: how a run's files (``results.json``, the CSVs, ``config.yaml``, the
    checkpoint's ``state.json``) have always been written. The ServerApp and strategies/ call it."""
    write_text(path, text, mode=0o600, durable=False)


def default_run_name(method: str, dataset: str) -> str:
    return f"{method}-{dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _key(metric: str) -> str:
    return metric.replace("-", "_")


class RunRecorder:
    """Collects what happens in a run and writes it to the run directory."""

    def __init__(
        self, run_dir: Path, header: dict[str, Any], plots: bool = True, tensorboard: bool = False
    ) -> None:
        self.run_dir = Path(run_dir)
        self.plots = plots
        self.tensorboard = tensorboard
        self._tb: Any = None  # the TensorBoardLog, opened at the first round this session ends
        self._tb_first_round: int | None = None  # set by resume: purge from this round on
        if tensorboard:
            from fedvit.tensorboard import check_available

            check_available()
        self.t0 = time.time()
        self.data: dict[str, Any] = {
            "schema": SCHEMA,
            **header,
            "status": "running",
            # the clock elapsed_s counts from (a resumed record keeps its first session's start)
            "started_at": datetime.fromtimestamp(self.t0).isoformat(timespec="milliseconds"),
            "clients": {},
            "resources": {},
            "evaluation": {},  # the evaluation protocol (set_evaluation)
            "rounds": [],
            "summary": {},
        }

    # ------------------------------------------------------------------ resume

    @classmethod
    def resume(
        cls,
        run_dir: Path,
        header: dict[str, Any],
        upto_round: int,
        plots: bool = True,
        tensorboard: bool = False,
    ) -> RunRecorder:
        """Continue the record of ``run_dir``, keeping the rounds up to ``upto_round`` (the event
        files too: later steps an earlier session wrote are purged)."""
        rec = cls(run_dir, header, plots, tensorboard)
        rec._tb_first_round = upto_round + 1
        path = rec.run_dir / "results.json"
        if path.is_file():
            old = json.loads(path.read_text())
            rec.data["rounds"] = [r for r in old.get("rounds", []) if r["round"] <= upto_round]
            rec.data["clients"] = old.get("clients", {})
            rec.data["evaluation"] = old.get("evaluation", {})
            rec.data["started_at"] = old.get("started_at", rec.data["started_at"])
            rec.data["resumed_at_round"] = upto_round
        return rec

    # ------------------------------------------------------------------ recording

    def set_clients(self, info: dict[int, dict[str, Any]]) -> None:
        self.data["clients"] = {str(cid): info[cid] for cid in sorted(info)}

    def set_resources(self, resources: dict[str, Any]) -> None:
        self.data["resources"] = resources

    def set_evaluation(self, protocol: dict[str, Any]) -> None:
        """The evaluation protocol (``results.json`` ``evaluation``): every client in every evaluated
        round, or a sampled fraction with the rounds where every client is evaluated."""
        self.data["evaluation"] = protocol

    def _round(self, server_round: int) -> dict[str, Any]:
        rounds = self.data["rounds"]
        if not rounds or rounds[-1]["round"] != server_round:
            rounds.append({"round": server_round})
        return rounds[-1]

    def record_train(
        self,
        server_round: int,
        per_client: dict[int, dict[str, float]],
        rejected: dict[str, str],
        failures: list[str],
    ) -> None:
        entry = self._round(server_round)
        entry["train"] = {
            "clients": sorted(per_client),
            "per_client": {str(c): per_client[c] for c in sorted(per_client)},
            "rejected": rejected,
            "failures": failures,
            "loss": summarize({c: m.get("train-loss") for c, m in per_client.items()}),
        }

    def record_eval(
        self,
        server_round: int,
        per_client: dict[int, dict[str, float]],
        failures: list[str],
        *,
        sampled: bool = False,
        clients_asked: int | None = None,
        clients_total: int | None = None,
    ) -> dict:
        """Record a round's evaluation. ``sampled``: only ``clients_asked`` of the
        ``clients_total`` live clients were asked (the statistics are over those that answered);
        otherwise every client was (``full``)."""
        entry = self._round(server_round)
        weights = {c: m.get("num-test", 0) for c, m in per_client.items()}
        val_weights = {c: m.get("num-val", 0) for c, m in per_client.items()}
        asked = clients_asked if clients_asked is not None else len(per_client) + len(failures)
        ev: dict[str, Any] = {
            "mode": "sampled" if sampled else "full",
            "clients_evaluated": len(per_client),
            "clients_asked": asked,
            "clients_total": clients_total if clients_total is not None else asked,
            "per_client": {str(c): per_client[c] for c in sorted(per_client)},
            "failures": failures,
        }
        # Further accuracies a method reports (e.g. anytime's test-acc-exit<d>) get summaries too.
        extra = sorted(
            {k for m in per_client.values() for k in m if k.startswith(("test-acc-", "val-acc-"))}
            - set(EVAL_METRICS)
        )
        for metric in (*EVAL_METRICS, *extra):
            w = val_weights if metric.startswith("val") else weights
            ev[_key(metric)] = summarize({c: m.get(metric) for c, m in per_client.items()}, w)
        entry["eval"] = ev
        return ev

    def end_round(self, server_round: int) -> None:
        self._round(server_round)["elapsed_s"] = round(time.time() - self.t0, 3)
        self.data["summary"] = self._summary()
        self.write()
        if self.tensorboard:
            self._write_tensorboard(self.data["rounds"][-1])

    def _write_tensorboard(self, entry: dict[str, Any]) -> None:
        if self._tb is None:
            from fedvit.tensorboard import TensorBoardLog

            self._tb = TensorBoardLog(self.run_dir, first_round=self._tb_first_round)
            if self._tb_first_round is None:
                d = self.data
                self._tb.write_text("run", f"{d.get('method')} on {d.get('dataset')} ({d.get('model')})")
        self._tb.write_round(entry)

    def finish(self) -> None:
        self.data["status"] = "completed"
        self.data["finished_at"] = datetime.now().isoformat(timespec="seconds")
        self.data["summary"] = self._summary()
        self.write()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.plots:
            from fedvit.plots import plot_run

            plot_run(self.data, self.run_dir)

    # ------------------------------------------------------------------ outputs

    def _summary(self) -> dict[str, Any]:
        """Last and best-validation rounds, both chosen among full-evaluation rounds only: a sampled
        round's statistics are over a subset of clients and not comparable."""
        evaluated = [r for r in self.data["rounds"] if "eval" in r and r["eval"]["test_acc"].get("n", 0) > 0]
        full = [r for r in evaluated if eval_mode(r) == "full"]
        counts = {"full_eval_rounds": len(full), "sampled_eval_rounds": len(evaluated) - len(full)}
        if not full:
            return {"rounds_completed": len(self.data["rounds"]), **counts}

        def pick(r: dict) -> dict:
            return {"round": r["round"], **{_key(m): r["eval"][_key(m)] for m in EVAL_METRICS}}

        last = full[-1]
        with_val = [r for r in full if r["eval"]["val_acc"].get("n", 0) > 0]
        best = max(with_val, key=lambda r: (r["eval"]["val_acc"]["mean"], r["round"])) if with_val else last
        return {
            "rounds_completed": len(self.data["rounds"]),
            **counts,
            "last_round": pick(last),
            "best_val_round": pick(best),
            "selection": "full-evaluation round (every client) with the highest unweighted mean "
            "validation accuracy (never test; sampled rounds are not candidates)",
        }

    def write(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "results.json", json.dumps(self.data, indent=1, default=float))
        atomic_write_text(self.run_dir / "metrics.csv", self._metrics_csv())
        atomic_write_text(self.run_dir / "clients.csv", self._clients_csv())

    def _metrics_csv(self) -> str:
        cols = ["round", "elapsed_s", "train_loss_mean", "num_train_clients"]
        cols += ["eval_mode", "num_eval_clients", "num_eval_clients_total"]  # full | sampled, k, N
        for m in EVAL_METRICS:
            cols += [f"{_key(m)}_{s}" for s in ("mean", "weighted_mean", "std", "q10", "q50", "q90")]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        for r in self.data["rounds"]:
            row: dict[str, Any] = {"round": r["round"], "elapsed_s": r.get("elapsed_s")}
            if "train" in r:
                row["train_loss_mean"] = r["train"]["loss"].get("mean")
                row["num_train_clients"] = len(r["train"]["clients"])
            if "eval" in r:
                row["eval_mode"] = eval_mode(r)
                row["num_eval_clients"] = r["eval"].get("clients_evaluated", len(r["eval"]["per_client"]))
                row["num_eval_clients_total"] = r["eval"].get("clients_total")
                for m in EVAL_METRICS:
                    for s in ("mean", "weighted_mean", "std", "q10", "q50", "q90"):
                        row[f"{_key(m)}_{s}"] = r["eval"][_key(m)].get(s)
            w.writerow(row)
        return buf.getvalue()

    def _clients_csv(self) -> str:
        cols = [
            "round",
            "client_id",
            "train_loss",
            "train_acc",
            *(_key(m) for m in EVAL_METRICS),
            "num_test",
            "num_val",
        ]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        for r in self.data["rounds"]:
            train = r.get("train", {}).get("per_client", {})
            ev = r.get("eval", {}).get("per_client", {})
            for cid in sorted({*train, *ev}, key=int):
                t, e = train.get(cid, {}), ev.get(cid, {})
                row = {
                    "round": r["round"],
                    "client_id": cid,
                    "train_loss": t.get("train-loss"),
                    "train_acc": t.get("train-acc"),
                    "num_test": e.get("num-test"),
                    "num_val": e.get("num-val"),
                }
                row.update({_key(m): e.get(m) for m in EVAL_METRICS})
                w.writerow(row)
        return buf.getvalue()
