"""Watching a measured run (step 1 of :mod:`fedvit.bench_round`): its process tree's memory
sampled from ``/proc`` (:class:`RunWatcher`), and where each round's time went in the workers,
from the messages :func:`fedvit.worker.traced` recorded."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SAMPLE_S = 1.0  # /proc sampling period of the run's process tree (a sample costs ~10 ms of CPU)


def rounded(x: float | None, nd: int = 3) -> float | None:
    """``x`` rounded to ``nd`` digits (``None`` stays ``None``)."""
    return None if x is None else round(x, nd)


def _statm_rss_bytes(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


class RunWatcher:
    """Samples the run's process tree's memory from ``/proc``.

    Cheap on purpose (it runs beside the measured run): ``/proc/<pid>/stat`` of every process,
    the environment of each process once, ``statm`` of the run's processes. Not PSS: reading
    ``smaps_rollup`` costs ~3 ms of kernel time per large process and sample.
    """

    def __init__(self, period_s: float = SAMPLE_S) -> None:
        self.period_s = period_s
        self.peak_rss = 0
        self.peak_procs = 0
        self.samples = 0
        self._tag: str | None = None
        self._tags: dict[tuple[int, int], str | None] = {}  # (pid, start) -> its runner tag
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RunWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a process may vanish between two reads
                self.sample()
            self._stop.wait(self.period_s)

    def processes(self) -> list[int]:
        """Pids of the run: this process's descendants and the runner-tagged ones (not this one)."""
        from fedvit.runner import TAG_VAR, all_procs, descendants, proc_environ

        me = os.getpid()
        procs = [p for p in all_procs() if p.state not in "ZX"]
        tags = {}
        for p in procs:
            key = (p.pid, p.start)
            if key not in self._tags:
                self._tags[key] = proc_environ(p.pid).get(TAG_VAR)
            tags[key] = self._tags[key]
        self._tags = tags  # forget the dead
        pids = {p.pid for p in descendants(me, procs)} - {me}
        if self._tag is None:
            self._tag = next(
                (tags[(p.pid, p.start)] for p in procs if p.pid in pids and tags[(p.pid, p.start)]), None
            )
        if self._tag is not None:
            pids |= {p.pid for p in procs if p.pid != me and tags[(p.pid, p.start)] == self._tag}
        return sorted(pids)

    def sample(self) -> None:
        pids = self.processes()
        rss = sum(_statm_rss_bytes(p) or 0 for p in pids)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, len(pids))
        self.samples += 1


def read_traces(directory: Path) -> list[dict[str, Any]]:
    """The messages :func:`fedvit.worker.traced` recorded under ``directory`` (all processes)."""
    records = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a killed worker
                records.append(json.loads(line))
    return records


def worker_usage(
    records: Sequence[Mapping[str, Any]],
    windows: Sequence[tuple[float, float]],
    slots: int,
    bounds: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Where each round's time went, from the workers' message records.

    ``windows``: each round's ``(start, end)`` on ``time.time()``'s clock; ``slots``: the workers
    that run at once. Per round: ``busy_s`` (sum over messages of their wall time inside the
    window), ``cpu_s`` (the CPU seconds of the messages that ended in it), ``idle_s`` = slots x
    round - busy (no message in a worker: Flower's hand-over, barriers, imbalance). With the
    round's compute bound B, round - B splits exactly into ``above_bound_work_s`` = cpu/slots - B
    (the workers' CPU beyond the pure compute), ``waiting_in_message_s`` = (busy - cpu)/slots
    (a message waiting for a core or the disk) and ``idle_per_slot_s`` = idle/slots.
    """
    out = []
    for i, (start, end) in enumerate(windows):
        length = end - start
        busy = sum(max(0.0, min(r["t1"], end) - max(r["t0"], start)) for r in records)
        ended = [r for r in records if start < r["t1"] <= end]
        cpu = sum(r["cpu_s"] for r in ended)
        row: dict[str, Any] = {
            "round_s": rounded(length),
            "messages": len(ended),
            "busy_s": rounded(busy),
            "cpu_s": rounded(cpu),
            "idle_s": rounded(slots * length - busy),
        }
        if bounds is not None:
            row["bound_s"] = rounded(bounds[i])
            row["above_bound_work_s"] = rounded(cpu / slots - bounds[i])
            row["waiting_in_message_s"] = rounded((busy - cpu) / slots)
            row["idle_per_slot_s"] = rounded((slots * length - busy) / slots)
        out.append(row)
    return out
