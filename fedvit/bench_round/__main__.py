"""``python -m fedvit.bench_round``: the children of ``fedvit bench round``, which print one JSON line:
``--floor N FLOATS ROUNDS CPUS`` (Flower's floor) or ``--costs CFG.pkl SECONDS`` (step costs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedvit.bench_round.compute import step_costs
from fedvit.bench_round.floor import floor_child


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--floor":
        result = floor_child(*(int(a) for a in sys.argv[2:6]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--costs":
        import pickle

        result = step_costs(pickle.loads(Path(sys.argv[2]).read_bytes()), seconds=float(sys.argv[3]))
    else:
        sys.exit("usage: python -m fedvit.bench_round --floor N FLOATS ROUNDS CPUS | --costs CFG.pkl SECONDS")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
