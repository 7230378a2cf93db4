"""Per-client summaries of a partition (what ``fedvit partition`` prints)."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.table import Table

from fedvit.config import FedvitConfig
from fedvit.data.partition import build_partition, client_source


def summarize_partition(cfg: FedvitConfig) -> list[dict[str, Any]]:
    """One dict per client: ``client_id``, ``n_train``, ``n_val``, ``n_test``, ``train_hist``, ``test_hist``
    (label histograms as lists of length ``data.num_classes``) and, for natural partitions, ``natural_id``.
    """
    part = build_partition(cfg)
    source = client_source(cfg)  # by the pooled protocol, train and test are the pooled split
    assert source.test is not None
    c = cfg.data.num_classes
    rows = []
    for k in range(part.num_clients):
        idx = part.client(k)
        row: dict[str, Any] = {
            "client_id": k,
            "n_train": len(idx.train),
            "n_val": len(idx.val),
            "n_test": len(idx.test),
            "train_hist": np.bincount(source.train.labels[idx.train], minlength=c).tolist(),
            "test_hist": np.bincount(source.test.labels[idx.test], minlength=c).tolist(),
        }
        if idx.natural_id is not None:
            row["natural_id"] = idx.natural_id
        rows.append(row)
    return rows


def _top_classes(hist: list[int], class_names: list[str] | None, top: int) -> str:
    counts = np.asarray(hist)
    order = [int(i) for i in np.argsort(-counts, kind="stable")[:top] if counts[i] > 0]
    name = (lambda i: class_names[i]) if class_names else str
    text = " ".join(f"{name(i)}:{counts[i]}" for i in order)
    more = int((counts > 0).sum()) - len(order)
    return text + (f" +{more}" if more > 0 else "")


def format_partition_table(
    summary: list[dict[str, Any]],
    class_names: list[str] | None = None,
    top: int = 4,
    title: str | None = None,
) -> Table:
    """A rich table: one row per client with split sizes, class counts and its most frequent labels."""
    natural = any("natural_id" in row for row in summary)
    table = Table(title=title or "partition", show_lines=False)
    table.add_column("client", justify="right")
    if natural:
        table.add_column("id")
    for name in ("train", "val", "test", "classes"):
        table.add_column(name, justify="right")
    table.add_column(f"train labels (top {top})")
    table.add_column(f"test labels (top {top})")
    for row in summary:
        cells = [str(row["client_id"])]
        if natural:
            cells.append(str(row.get("natural_id", "")))
        cells += [str(row["n_train"]), str(row["n_val"]), str(row["n_test"])]
        cells.append(str(int(np.count_nonzero(row["train_hist"]))))
        cells.append(_top_classes(row["train_hist"], class_names, top))
        cells.append(_top_classes(row["test_hist"], class_names, top))
        table.add_row(*cells)
    totals = {key: sum(row[key] for row in summary) for key in ("n_train", "n_val", "n_test")}
    table.caption = (
        f"{len(summary)} clients; train {totals['n_train']}, val {totals['n_val']}, test {totals['n_test']}"
    )
    return table
