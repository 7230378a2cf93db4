"""What a round reports: the metrics Flower's ``Result`` keeps for it, and the progress line."""

from __future__ import annotations

from typing import Any

from flwr.app import MetricRecord


def eval_record(ev: dict[str, Any], num_clients: int, sampled: bool) -> MetricRecord:
    """The round's evaluation metrics from what ``RunRecorder.record_eval`` returned."""
    t = ev["test_acc"]
    return MetricRecord(
        {
            "test-acc-mean": t.get("mean", float("nan")),
            "test-acc-weighted": t.get("weighted_mean", float("nan")),
            "test-acc-std": t.get("std", float("nan")),
            "val-acc-mean": ev["val_acc"].get("mean", float("nan")),
            "num-clients": num_clients,
            "num-clients-total": int(ev["clients_total"]),
            "sampled": int(sampled),
        }
    )


def progress_line(
    rnd: int,
    num_rounds: int,
    seconds: float,
    train: MetricRecord | None,
    ev: MetricRecord | None,
    train_extra: str | None = None,
) -> str:
    """``round r/R | time | train loss (clients)[ | train_extra] | test acc ± std (weighted), val acc``,
    with ``(sampled k/N)`` after a sampled evaluation."""
    parts = [f"round {rnd}/{num_rounds}", f"{seconds:.1f}s"]
    if train is not None:
        parts.append(f"train loss {train['train-loss']:.4f} ({int(train['num-clients'])} clients)")
        if train_extra is not None:
            parts.append(train_extra)
    if ev is not None:
        parts.append(
            f"test acc {ev['test-acc-mean']:.4f} ± {ev['test-acc-std']:.4f} "
            f"(weighted {ev['test-acc-weighted']:.4f}), val acc {ev['val-acc-mean']:.4f}"
        )
        if "sampled" in ev and int(ev["sampled"]):
            parts[-1] += f" (sampled {int(ev['num-clients'])}/{int(ev['num-clients-total'])})"
    return " | ".join(parts)
