"""Where the start-up of a ``fedvit run`` goes: a timeline of its processes, files and log lines.

Runs a command (normally ``fedvit run ...``) and, every 0.2 s until it exits, notes when each kind
of process of the run is first and last seen (SuperLink, SuperExec, the Ray head, GCS, raylet,
``flwr-simulation``, Ray's workers before and after they become client actors) and when each
file under OUT_DIR appears; echoes the command's ``fedvit:`` and round lines with their times.
With ``--sample-simulation`` it also samples the stacks of every thread of ``flwr-simulation``
every 0.1 s (a ``sitecustomize`` put on its ``PYTHONPATH``) and prints each thread's changes of
activity: what the ServerApp thread and Flower's start of the Ray backend wait on.

    python scripts/run_timeline.py /tmp/tl --sample-simulation -- \\
        fedvit run -c "... output-dir='/tmp/tl' ..."

Times are seconds after the command starts. Measurement tool for docs/experiments.md (issue 14).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedvit.launch.procs import descendants

#: Substrings of a command line, first match wins.
KINDS = (
    "fedvit.launch.watchdog",
    "flower-superlink",
    "flower-superexec",
    "ray start",
    "gcs_server",
    "raylet",
    "flwr-simulation",
    "ray::ClientAppActor",
    "ray::IDLE",
    "ray.util.client.server",
)

_SAMPLER = """
import os, sys, threading, time, traceback
if sys.argv and sys.argv[0].endswith("flwr-simulation"):
    _out = open(os.path.join(os.environ["FEDVIT_TIMELINE_DIR"], f"sim-{os.getpid()}.txt"), "w")
    def _sample():
        while True:
            now = time.time()
            for tid, frame in sys._current_frames().items():
                if tid == threading.get_ident():
                    continue
                stack = traceback.extract_stack(frame)
                importing = any("importlib" in f.filename for f in stack)
                names = [f"{os.path.basename(f.filename)}:{f.name}"
                         for f in stack if "importlib" not in f.filename]
                _out.write(f"{now:.2f} {tid} {'IMPORT ' if importing else ''}{' > '.join(names[-4:])}\\n")
            _out.flush()
            time.sleep(0.1)
    threading.Thread(target=_sample, daemon=True).start()
"""


def _kind(pid: int) -> str | None:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return next((k for k in KINDS if k in cmd), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="the run's output directory (files are timed there)")
    p.add_argument("--sample-simulation", action="store_true", help="sample flwr-simulation's thread stacks")
    p.usage = "%(prog)s OUT_DIR [--sample-simulation] -- COMMAND ..."
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        p.error("give the command to time after --")
    cut = argv.index("--")
    args, cmd = p.parse_args(argv[:cut]), argv[cut + 1 :]
    if not cmd:
        p.error("no command given after --")
    env = dict(os.environ)
    sample_dir = None
    if args.sample_simulation:
        sample_dir = Path(tempfile.mkdtemp(prefix="fedvit-timeline-"))
        (sample_dir / "sitecustomize.py").write_text(_SAMPLER)
        env["PYTHONPATH"] = os.pathsep.join([str(sample_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["FEDVIT_TIMELINE_DIR"] = str(sample_dir)
    wall0, t0 = time.time(), time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - t0, line.rstrip()))

    threading.Thread(target=pump, daemon=True).start()
    seen: dict[str, list[float]] = {}
    files: dict[str, float] = {}
    while proc.poll() is None:
        now = time.monotonic() - t0
        counts: dict[str, int] = {}
        for pr in descendants(proc.pid):  # this run's processes only
            k = _kind(pr.pid)
            if k is not None:
                counts[k] = counts.get(k, 0) + 1
        for k, n in counts.items():
            first, _last, most = seen.get(k, [now, now, 0])
            seen[k] = [first, now, max(most, n)]
        if args.out_dir.is_dir():
            for path in args.out_dir.rglob("*"):
                if path.is_file():
                    files.setdefault(str(path.relative_to(args.out_dir)), now)
        time.sleep(0.2)
    print(f"exit code {proc.returncode} after {time.monotonic() - t0:.1f} s")
    for k, (first, last, most) in sorted(seen.items(), key=lambda kv: kv[1][0]):
        print(f"process {k:24s} first {first:6.1f}  last {last:6.1f}  at most {most}")
    for name, t in sorted(files.items(), key=lambda kv: kv[1]):
        if "/" not in name:
            print(f"file    {t:6.1f}  {name}")
    for t, line in lines:
        if line.startswith("fedvit:") or "configure_train" in line or "[fedvit] round" in line:
            print(f"log     {t:6.1f}  {line[:140]}")
    if sample_dir is not None:
        for trace in sorted(sample_dir.glob("sim-*.txt")):
            print(f"flwr-simulation thread activity ({trace.name}):")
            last: dict[str, str] = {}
            for row in trace.read_text().splitlines():
                stamp, tid, what = row.split(" ", 2)
                if last.get(tid) != what:
                    last[tid] = what
                    print(f"  {float(stamp) - wall0:6.2f}  thread {int(tid) % 10000:04d}  {what[:150]}")
    return proc.returncode or 0


if __name__ == "__main__":
    raise SystemExit(main())
