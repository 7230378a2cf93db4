"""A tiny throwaway Flower app (numpy only) and process helpers for the runner and CLI tests."""

from __future__ import annotations

import os
from pathlib import Path

from fedvit import runner
from fedvit.runner import all_procs, proc_environ

MARK = "FEDVIT_TEST_MARK"


TINY_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "0.1.0"
description = "throwaway Flower app for fedvit's runner tests"
license = "Apache-2.0"
dependencies = ["flwr[simulation]"]

[tool.hatch.build.targets.wheel]
packages = ["tinyapp"]

[tool.flwr.app]
publisher = "fedvit-tests"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"

[tool.flwr.app.config]
num-server-rounds = 2
fail = false
sleep = 0.0
output-dir = ""
label = ""
"""

TINY_CLIENT = """\
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = {k: Array(v.numpy() + 1.0) for k, v in msg.content["arrays"].items()}
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 1})})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "acc": 0.5})}), reply_to=msg)
"""

TINY_SERVER = """\
import json
import os
import time
from pathlib import Path

import numpy as np
import ray
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    if cfg["fail"]:
        raise RuntimeError("tinyapp: deliberate failure")
    time.sleep(float(cfg["sleep"]))
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=2)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))}),
        num_rounds=int(cfg["num-server-rounds"]),
    )
    if cfg["output-dir"]:
        out = Path(cfg["output-dir"])
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "w": result.arrays["w"].numpy().tolist(),
            "cwd": os.getcwd(),
            "output-dir": cfg["output-dir"],
            "label": cfg["label"],
            # the Ray instance the simulation (this process) joined or started
            "ray_gcs": ray.get_runtime_context().gcs_address if ray.is_initialized() else None,
        }
        (out / "result.json").write_text(json.dumps(record))
"""


def write_tiny_app(root: Path) -> Path:
    """A numpy-only Flower app: FedAvg over 2 supernodes; knobs ``fail``, ``sleep``, ``output-dir``."""
    app = root / "tinyapp"
    (app / "tinyapp").mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(TINY_PYPROJECT)
    (app / "tinyapp" / "__init__.py").write_text("")
    (app / "tinyapp" / "client.py").write_text(TINY_CLIENT)
    (app / "tinyapp" / "server.py").write_text(TINY_SERVER)
    return app


def marked(mark: str) -> list[runner.Proc]:
    """Live processes other than this one whose environment carries ``FEDVIT_TEST_MARK=mark``."""
    me = os.getpid()
    return [
        p
        for p in all_procs()
        if p.pid != me and p.state not in "ZX" and proc_environ(p.pid).get(MARK) == mark
    ]


def describe_procs(procs: list[runner.Proc]) -> list[str]:
    out = []
    for p in procs:
        try:
            cmd = Path(f"/proc/{p.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
        except OSError:
            cmd = "?"
        out.append(f"{p.pid} {p.state} {cmd}")
    return out
