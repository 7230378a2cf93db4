"""Flower ServerApp: builds the method's strategy from the config and writes the results.

The run directory is ``<output.dir>/<run-name>/`` (see :mod:`fedvit.results`). With
``server.resume`` pointing at an earlier run directory, the run continues after the last
checkpointed round with the same server state and run name (so clients find their private
state again).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedvit.config import FedvitConfig, load_config, to_dict, to_yaml
from fedvit.evaluation import resource_counts
from fedvit.params import ParameterSplit, count, get_arrays
from fedvit.preflight import check_server
from fedvit.registry import get_client, get_strategy
from fedvit.results import RunRecorder, atomic_write_text, default_run_name
from fedvit.wire import to_record

app = ServerApp()


def run_directory(cfg: FedvitConfig) -> tuple[Path, str]:
    """(run directory, run name) for a new or resumed run."""
    if cfg.server.resume:
        run_dir = Path(cfg.server.resume).expanduser().resolve()
        if not (run_dir / "checkpoint" / "state.json").is_file():
            raise FileNotFoundError(f"server.resume: {run_dir} holds no checkpoint/state.json")
        return run_dir, run_dir.name
    run_name = cfg.output.run_name or default_run_name(cfg.method.name, cfg.data.name)
    run_dir = Path(cfg.output.dir).expanduser().resolve() / run_name
    if (run_dir / "results.json").exists():
        raise FileExistsError(
            f"output.run_name: {run_dir} already holds a run; pick another name or resume it"
        )
    return run_dir, run_name


def run(grid: Grid, cfg: FedvitConfig) -> Path:
    """Run the whole federation for ``cfg``; returns the run directory."""
    from logging import INFO

    # Here, not at the top: in a simulation Flower loads the ClientApp in this process before it
    # starts Ray's workers, and its imports wait for the ServerApp module's; timm (~2 s of
    # imports) is not among the ClientApp's, so the workers start that much earlier.
    from fedvit.models import build_model, example_input

    check_server(grid, cfg)  # data, partition, model checked before any client is asked (local data only)
    run_dir, run_name = run_directory(cfg)
    model = build_model(cfg)
    split = ParameterSplit.from_model(model, cfg.method.private)
    header = {
        "run_name": run_name,
        "method": cfg.method.name,
        "dataset": cfg.data.name,
        "model": cfg.model.name,
        "config": to_dict(cfg),
    }
    strategy_cls = get_strategy(cfg.method.strategy)
    recorder = RunRecorder(run_dir, header, plots=cfg.output.plots, tensorboard=cfg.output.tensorboard)
    strategy = strategy_cls.from_config(
        cfg, model=model, split=split, recorder=recorder, run_dir=run_dir, run_name=run_name
    )
    arrays_record = None
    start_round = 1
    if cfg.server.resume:
        last, arrays_record = strategy.load_checkpoint(run_dir / "checkpoint")
        recorder = RunRecorder.resume(
            run_dir, header, last, plots=cfg.output.plots, tensorboard=cfg.output.tensorboard
        )
        strategy.recorder = recorder
        start_round = last + 1
        log(INFO, "[fedvit] resuming %s after round %d", run_dir, last)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        arrays_record = to_record(get_arrays(model, split.shared))
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    resources = resource_counts(model, split, example_input(cfg))
    full = count(split.shapes(model, "shared")) + count(split.shapes(model, "private"))
    resources["params_model"] = full
    resources = get_client(cfg.method.client).adjust_resources(resources, model, cfg)
    resources.update(strategy.server_resources())
    recorder.set_resources(resources)
    log(
        INFO,
        "[fedvit] %s: %d parameters, %d private, %d shared -> %s",
        cfg.method.name,
        full,
        resources["params_private_per_client"],
        resources["params_sent_up_per_round"],
        run_dir,
    )
    strategy.start(
        grid=grid,
        initial_arrays=arrays_record,
        num_rounds=cfg.server.num_rounds,
        timeout=cfg.server.round_timeout,
        start_round=start_round,
    )
    recorder.finish()
    log(INFO, "[fedvit] results: %s", run_dir / "results.json")
    return run_dir


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of the ServerApp."""
    run(grid, load_config(context.run_config))
