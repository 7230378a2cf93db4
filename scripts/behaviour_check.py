"""Behaviour check: does every method still compute exactly what it computed before a refactoring?

Runs every registered method (every YAML in ``conf/method/``) for 2 rounds with seed 0 on the same
tiny in-process federation (3 clients on scikit-learn's digits, a 2-block ViT, ``InProcessGrid``:
the real ServerApp and ClientApp, no Ray) and writes, per method and round, every client's train
loss and test/val accuracy and loss from ``results.json``, plus a SHA-256 of the final checkpoint
(shared arrays and strategy state), to a JSON. ``--compare BASELINE`` then exits 1 and names every
method whose numbers are not bit-identical to the baseline's (or that the baseline lacks).

    .venv/bin/python scripts/behaviour_check.py --out now.json [--methods fedavg fedtp ...]
    .venv/bin/python scripts/behaviour_check.py --compare tests/data/behaviour-baseline.json

A baseline is made from an untouched copy of a commit (so nobody's uncommitted edits enter it):
``git archive HEAD | tar -x -C /tmp/head``, then in ``/tmp/head``
``/work/main/.venv/bin/python scripts/behaviour_check.py --commit <sha> --out baseline.json``.

Each method runs in a fresh directory with the global RNGs re-seeded and one torch thread, so its
numbers do not depend on which other methods ran before it (a subset checks like the whole set).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The code under test is this checkout's (a `git archive` copy for a baseline included), not the
# one the venv's editable install points to: this root goes first on the import path.
sys.path.insert(0, str(ROOT))
ROUNDS = 2
CLIENTS = 3
SEED = 0
#: Overrides of every method's run: small enough that all methods take about a minute on one core.
TINY = (
    f"seed={SEED} model.depth=2 model.embed_dim=16 model.num_heads=2 data.max_train_per_client=40 "
    "train.batch_size=32 train.local_epochs=1 output.plots=false output.tensorboard=false"
)
#: Per-method additions (hypernetwork sizes, the anytime adapter width, the async server's knobs).
EXTRA = {
    "anytime": "model.anytime.width=8",
    "fedtp": "method.options.embed_dim=8 method.options.hidden=16",
    "fedtp-per": "method.options.embed_dim=8 method.options.hidden=16",
    "pfedla": "method.options.embed_dim=8 method.options.hidden=16",
    "heurpfedla": "method.options.embed_dim=8 method.options.hidden=16",
    "ffgg-async": (
        "method.options.concurrency=2 method.options.speed_tiers=[1.0,3.0] "
        "method.options.updates_per_round=3 method.options.private_steps=2"
    ),
}
#: Per-client numbers recorded from each round of ``results.json``.
TRAIN_KEYS = ("train-loss",)
EVAL_KEYS = ("test-acc", "test-loss", "val-acc", "val-loss")


def methods() -> list[str]:
    """Every registered method: the YAMLs in ``conf/method/``."""
    return sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))


def settings() -> dict[str, Any]:
    """What shapes the numbers; a baseline made with other settings cannot be compared."""
    return {"rounds": ROUNDS, "clients": CLIENTS, "seed": SEED, "overrides": TINY, "extra": EXTRA}


def arrays_digest(*paths: Path) -> str:
    """SHA-256 over every array (name, dtype, shape, bytes) of the given ``.npz`` files that exist."""
    import numpy as np

    h = hashlib.sha256()
    for path in paths:
        if not path.is_file():
            continue
        with np.load(path) as z:
            for name in sorted(z.files):
                a = np.ascontiguousarray(z[name])
                h.update(f"{path.name}:{name}:{a.dtype.str}:{a.shape}".encode())
                h.update(a.tobytes())
    return h.hexdigest()


def per_client(block: dict[str, Any], keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``{metric: {client: value}}`` for ``keys``, clients in numeric order."""
    clients = sorted(block.get("per_client", {}), key=int)
    return {k: {c: block["per_client"][c].get(k) for c in clients} for k in keys}


def run_method(method: str, workdir: Path, extra: str = "") -> dict[str, Any]:
    """One method's 2-round tiny federation; its per-round numbers and checkpoint digest.
    ``extra``: further overrides (e.g. ``clients.device=cuda``); a baseline is made without."""
    import numpy as np
    import torch

    from fedvit.config import load_config
    from fedvit.inprocess import InProcessGrid
    from fedvit.server_app import run

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    rc = {
        "method": method,
        "num-server-rounds": ROUNDS,
        "num-clients": CLIENTS,
        "output-dir": str(workdir / "out"),
        "run-name": method,
        "overrides": f"{TINY} data.cache_dir={workdir / 'cache'} {EXTRA.get(method, '')} {extra}".strip(),
    }
    run_dir = run(InProcessGrid(rc, CLIENTS), load_config(rc))
    results = json.loads((run_dir / "results.json").read_text())
    if results.get("status") != "completed":
        raise RuntimeError(f"{method}: run ended with status {results.get('status')!r}")
    rounds = []
    for r in results["rounds"]:
        entry: dict[str, Any] = {"round": r["round"], **per_client(r.get("train", {}), TRAIN_KEYS)}
        if "eval" in r:
            entry.update(per_client(r["eval"], EVAL_KEYS))
        rounds.append(entry)
    ckpt = run_dir / "checkpoint"
    return {"rounds": rounds, "checkpoint_sha256": arrays_digest(ckpt / "arrays.npz", ckpt / "strategy.npz")}


def git_state(commit: str | None = None) -> dict[str, Any]:
    """The commit the numbers were made at, and which tracked code files differed from it;
    ``commit`` given: a copy of that commit (``git archive``), which has no git state to ask."""
    if commit:
        return {"commit": commit, "uncommitted": []}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout

    paths = ("fedvit", "strategies", "clients", "conf")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *paths).splitlines()
    return {"commit": git("rev-parse", "HEAD").strip(), "uncommitted": sorted(line[3:] for line in dirty)}


def collect(names: list[str], commit: str | None = None) -> dict[str, Any]:
    """Run ``names`` (each in a fresh temporary directory); the JSON document."""
    import torch

    for key, value in (
        ("FLWR_TELEMETRY_ENABLED", "0"),
        ("FLWR_DISABLE_UPDATE_CHECK", "1"),
        ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
    ):
        os.environ.setdefault(key, value)
    torch.set_num_threads(1)
    out: dict[str, Any] = {**git_state(commit), "settings": settings(), "methods": {}, "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="fedvit-behaviour-") as tmp:
        os.environ["FEDVIT_STATE_DIR"] = str(Path(tmp) / "state")
        for name in names:
            start = time.perf_counter()
            out["methods"][name] = run_method(name, Path(tmp) / name)
            out["seconds"][name] = round(time.perf_counter() - start, 2)
            print(f"[behaviour] {name}: {out['seconds'][name]:.1f} s", file=sys.stderr, flush=True)
    return out


def compare(baseline: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per method of ``current`` whose numbers differ from ``baseline``'s (empty: identical)."""
    if baseline.get("settings") != current.get("settings"):
        return ["settings differ from the baseline's (rounds, clients, seed or overrides): remake it"]
    problems = []
    for name, entry in current["methods"].items():
        base = baseline["methods"].get(name)
        if base is None:
            problems.append(f"{name}: not in the baseline")
            continue
        if json.dumps(base, sort_keys=True) == json.dumps(entry, sort_keys=True):
            continue
        what = [
            f"round {b['round']} {key}"
            for b, c in zip(base["rounds"], entry["rounds"], strict=False)
            for key in sorted(set(b) | set(c))
            if json.dumps(b.get(key), sort_keys=True) != json.dumps(c.get(key), sort_keys=True)
        ]
        if len(base["rounds"]) != len(entry["rounds"]):
            what.append(f"{len(entry['rounds'])} rounds instead of {len(base['rounds'])}")
        if base["checkpoint_sha256"] != entry["checkpoint_sha256"]:
            what.append("checkpoint")
        problems.append(f"{name}: differs ({', '.join(what)})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", help="only these methods (default: every conf/method/*.yaml)")
    parser.add_argument("--out", type=Path, help="write the numbers to this JSON")
    parser.add_argument("--compare", type=Path, metavar="BASELINE", help="exit 1 unless bit-identical to it")
    parser.add_argument("--commit", help="record this commit (running from a `git archive` copy of it)")
    args = parser.parse_args(argv)
    known = methods()
    names = args.methods or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; registered: {known}")
    baseline = json.loads(args.compare.read_text()) if args.compare else None
    current = collect(names, args.commit)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    if baseline is None:
        return 0
    problems = compare(baseline, current)
    for line in problems:
        print(f"[behaviour] {line}", file=sys.stderr)
    if not problems:
        print(f"[behaviour] {len(names)} method(s) bit-identical to {args.compare}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
