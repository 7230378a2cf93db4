"""The ``fedvit`` command.

    fedvit run [APP_DIR] [--run-config "k=v ..."]... [--federation-config "k=v ..."]...
               [--superlink NAME | --ray-address HOST:PORT] [--timeout S] [--quiet] [--flwr-home DIR]
    fedvit partition [--run-config "k=v ..."]... [--top N] [--json]
    fedvit config [--run-config "k=v ..."]... [--json]
    fedvit bench pfedla-memory [--clients N ...] [--overrides "k=v ..."] [--out FILE.json]
    fedvit bench round [--run-config "k=v ..."]... [--app DIR] [--skip-floor] [--skip-bound] [--out FILE.json]
    fedvit alpha RUN_DIR [--out FILE.png] [--used]

``--run-config`` takes Flower's syntax (``"method='fedper' num-server-rounds=5"``, or a ``.toml``
file) and may be repeated; later values win. Bare words are strings (``method=fedper``).

Exit codes: 0 success; 1 the run failed (or its machinery did); 2 a configuration error (one
line on stderr); 124 the run timed out; 130 interrupted (Ctrl-C); 128+N killed by signal N.

Adding a subcommand: write ``_add_<name>(subparsers)`` that registers its parser and sets
``func`` (a ``(args) -> int`` handler) with ``set_defaults``, and append it to :data:`COMMANDS`.
Handlers import what they need lazily, so ``fedvit config`` stays fast; raise
:class:`~fedvit.config.ConfigError` for user errors. Planned: ``export``, ``pretrain`` (see docs).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedvit.config import ConfigError

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


def _err(msg: str) -> None:
    print(f"fedvit: {msg}", file=sys.stderr, flush=True)


def _add_run_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--run-config",
        action="append",
        metavar="'k=v ...'|FILE.toml",
        help="run-config overrides in Flower's syntax, e.g. \"method='fedper' num-server-rounds=5\" "
        "or a .toml file; repeatable, later values win",
    )


def _run_config(args: argparse.Namespace) -> dict[str, Any]:
    from fedvit.launch.runconfig import load_kv_args  # not fedvit.runner: its process machinery

    return load_kv_args(args.run_config, "run-config")


# --------------------------------------------------------------------------- run


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a federation with flwr run; fails loudly",
        description="Run the app with `flwr run` on a private, throwaway SuperLink (or on --superlink), "
        "stream its log, and exit non-zero unless it ends as finished:completed. The config is "
        "validated here first; relative paths are made absolute against the current directory.",
    )
    p.add_argument("app_dir", nargs="?", default=".", metavar="APP_DIR", help="Flower app (default: .)")
    _add_run_config_arg(p)
    p.add_argument(
        "--federation-config",
        action="append",
        metavar="'k=v ...'",
        help='simulation settings, e.g. "num-supernodes=5 client-resources-num-gpus=0.5"; '
        "defaults: num-supernodes = clients.num_clients, client-resources-num-cpus=1, "
        "client-resources-num-gpus = the visible GPUs shared by the clients (0 without GPUs "
        "or with clients.device=cpu)",
    )
    p.add_argument(
        "--superlink",
        metavar="NAME",
        help="submit to this SuperLink connection of FLWR_HOME/config.toml (deployment) instead of "
        "starting a private one; nothing is started or torn down then",
    )
    p.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="simulate on a running Ray cluster (`ray start --head` here, `ray start --address=HOST:PORT` "
        "on the other machines): clients run on all its nodes; default $RAY_ADDRESS. Its nodes are "
        "checked first (client state directory shared, data present); see docs/deployment.md",
    )
    p.add_argument("--flwr-home", metavar="DIR", help="FLWR_HOME to use (default: a temp dir for local runs)")
    p.add_argument("--timeout", type=float, metavar="S", help="stop the run after S seconds (exit 124)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not stream the run's log")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from fedvit.runner import describe, run_flwr

    fed_extra = _kv(args.federation_config, "federation-config")
    num = fed_extra.pop("num-supernodes", None)
    cpus = fed_extra.pop("client-resources-num-cpus", 1)
    gpus = fed_extra.pop("client-resources-num-gpus", None)  # None: share the GPUs, if any
    outcome = run_flwr(
        args.app_dir,
        _run_config(args),
        num_supernodes=num,
        cpus_per_client=cpus,
        gpus_per_client=gpus,
        federation_config_extra=fed_extra,
        superlink=args.superlink,
        ray_address=args.ray_address,
        flwr_home=args.flwr_home,
        timeout_s=args.timeout,
        stream=not args.quiet,
        progress=None if args.quiet else _err,
    )
    if outcome.ok:
        print(describe(outcome), flush=True)
        return 0
    # Streamed logs already showed the end of the run; a quiet run shows its tail now.
    _err(describe(outcome, log_lines=25 if args.quiet else 0))
    return outcome.returncode or 1


def _kv(values: list[str] | None, what: str) -> dict[str, Any]:
    from fedvit.runner import load_kv_args

    return load_kv_args(values, what)


# --------------------------------------------------------------------------- partition


def _add_partition(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "partition",
        help="preview how the data is split over clients",
        description="Build (or load from cache) the partition of a config and print per-client split "
        "sizes and label histograms.",
    )
    _add_run_config_arg(p)
    p.add_argument("--top", type=int, default=4, help="most frequent labels shown per client (default 4)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.set_defaults(func=_cmd_partition)


def _cmd_partition(args: argparse.Namespace) -> int:
    from fedvit.config import load_config
    from fedvit.data import describe_protocol, format_partition_table, summarize_partition
    from fedvit.preflight import check

    cfg = load_config(_run_config(args))
    check(cfg)  # corrupt files, classes, image shapes: one line naming the key, like fedvit run
    summary = summarize_partition(cfg)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    title = f"{cfg.data.name}: {describe_protocol(cfg)}"
    table = format_partition_table(summary, top=args.top, title=title)
    if isinstance(table, str):
        print(table)
    else:
        from rich.console import Console

        Console(width=max(100, _terminal_width())).print(table)
    return 0


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((120, 24)).columns


# --------------------------------------------------------------------------- config


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="print the resolved configuration",
        description="Compose the YAML layers and the run config, validate, and print the result.",
    )
    _add_run_config_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p.set_defaults(func=_cmd_config)


def _cmd_config(args: argparse.Namespace) -> int:
    from fedvit.config import load_config, to_dict, to_yaml

    cfg = load_config(_run_config(args))
    if args.json:
        print(json.dumps(to_dict(cfg), indent=2))
    else:
        print(to_yaml(cfg), end="")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="one table from finished runs",
        description="Client accuracy (mean ± std over clients, weighted mean, q10-q90) and resources "
        "(storage, computation, communication; absolute and relative to FedAvg on the same dataset) "
        "of each run directory, as Markdown (and CSV with --csv).",
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="outputs/<run-name> directories, or one sweep directory (its table over seeds)",
    )
    p.add_argument(
        "--select",
        choices=("last", "best-val"),
        default="last",
        help="which round: the last, or the one with the best mean validation accuracy",
    )
    p.add_argument("--csv", type=Path, metavar="FILE", help="also write the rows as CSV")
    p.add_argument(
        "--paper",
        metavar="NAME|FILE.yaml",
        help="put a published table beside the runs, grouped by method over seeds (last round): "
        "conf/paper/<NAME>.yaml (e.g. fedperfix-table2) or a YAML path; prints both rank orders and "
        "Kendall's tau",
    )
    p.add_argument(
        "--paper-dataset",
        metavar="COLUMN",
        help="the paper's column to compare with (default: the one holding the runs' dataset)",
    )
    p.add_argument(
        "--curves",
        type=Path,
        metavar="FILE.png",
        help="write accuracy vs round of every method (mean over seeds, min-max band; rounds where "
        "every client was evaluated)",
    )
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from fedvit.report import ReportError, collect, report_methods, to_csv, to_markdown

    if args.paper or args.curves or args.paper_dataset:  # runs grouped by method over seeds
        try:
            if args.select != "last":
                raise ReportError("--paper and --curves report the last round (--select last)")
            rows, text = report_methods(
                args.run_dirs, paper=args.paper, paper_dataset=args.paper_dataset, curves=args.curves
            )
        except ReportError as err:
            _err(f"error: {err}")
            return EXIT_CONFIG
        print(text, end="")
        if args.csv:
            args.csv.write_text(to_csv(rows))
        return 0
    if len(args.run_dirs) == 1 and (args.run_dirs[0] / "sweep.json").is_file():
        from fedvit.sweep import report_sweep

        rows, text = report_sweep(args.run_dirs[0])  # a sweep: mean ± std over seeds
        print(text, end="")
        if args.csv:
            args.csv.write_text(to_csv(rows))
        return 0
    try:
        rows = collect(args.run_dirs, select=args.select)
    except ReportError as err:
        _err(f"error: {err}")
        return EXIT_CONFIG
    print(to_markdown(rows), end="")
    if args.csv:
        args.csv.write_text(to_csv(rows))
    return 0


# --------------------------------------------------------------------------- study


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="the 'where to personalize' study: one federation per private layer type",
        description="Run, with one base config, one federation per choice of private parameters "
        "(each layer type alone and with the head, all-local, all-global) and write study.md and "
        "study.csv (client accuracy mean ± std; overall = mean of stand-alone and combined).",
    )
    p.add_argument("study", choices=("where-to-personalize",), help="which study")
    _add_run_config_arg(p)
    p.add_argument(
        "--engine",
        choices=("simulation", "inprocess"),
        default="simulation",
        help="simulation: flwr run with Ray (default); inprocess: the same federation in this process",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        metavar="DIR",
        help="study directory: run directories, study.md, study.csv (default: <output.dir>/<study>)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="LAYER",
        help="run only these layer types (patch_embed pos_embed norm attn mlp head all-local all-global)",
    )
    p.add_argument("--resume", action="store_true", help="skip completed runs, continue interrupted ones")
    p.set_defaults(func=_cmd_study)


def _cmd_study(args: argparse.Namespace) -> int:
    from fedvit.study import run_study, to_markdown

    outcome = run_study(
        _run_config(args),
        output_dir=args.output_dir,
        engine=args.engine,
        only=args.only,
        resume=args.resume,
        progress=_err,
    )
    print(to_markdown(outcome.rows), end="", flush=True)
    print(f"study: {outcome.study_dir / 'study.md'}", flush=True)
    if outcome.failed:
        _err(f"error: {len(outcome.failed)} run(s) failed: {', '.join(outcome.failed)}")
        return 1
    return 0


# --------------------------------------------------------------------------- sweep


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="a grid of run-config values × seeds, one run directory each, one table over seeds",
        description="Run every combination of a sweep spec (YAML: base, grid, runs, seeds, engine, out; "
        "or the same from the command line, which wins over the file) in its own directory named from "
        "its values; skip completed runs, continue interrupted ones from their checkpoint; a failed run "
        "does not stop the others (exit 1 at the end). Writes sweep.json after every run, then "
        "sweep.md / sweep.csv: mean ± std over seeds of the clients' mean test accuracy. "
        "See docs/configuration.md, 'Sweeps'.",
    )
    p.add_argument("spec", nargs="?", type=Path, metavar="SPEC.yaml", help="the sweep spec (optional)")
    _add_run_config_arg(p)  # the base values
    p.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2,...",
        help="one grid key and its values, e.g. \"method=fedavg,fedper\" or "
        "\"method.private=[attn],[head]\"; repeatable; run-config keys or dotted config keys",
    )
    p.add_argument("--seeds", type=int, nargs="+", metavar="N", help="run every combination once per seed")
    p.add_argument(
        "--engine", choices=("simulation", "inprocess"), help="default: the spec's, else simulation"
    )
    p.add_argument("--out", type=Path, metavar="DIR", help="the sweep directory (default: the spec's out)")
    p.add_argument("--dry-run", action="store_true", help="check every run's config and list the runs only")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fedvit.sweep import out_dir_of, plan, run_sweep, spec_from_args

    spec = spec_from_args(
        args.spec,
        base=_run_config(args) if args.run_config else None,
        grid=args.grid,
        seeds=args.seeds,
        engine=args.engine,
        out=args.out,
    )
    if args.dry_run:
        from fedvit.sweep import check

        out = out_dir_of(spec)
        check(spec)
        for r in plan(spec):
            print(out / r.name, flush=True)
        return 0
    outcome = run_sweep(spec, progress=_err)
    print(outcome.markdown, end="", flush=True)
    print(f"sweep: {outcome.out_dir / 'sweep.md'}", flush=True)
    if outcome.failed:
        _err(f"error: {len(outcome.failed)} run(s) failed: {', '.join(outcome.failed)}")
        return 1
    return 0


# --------------------------------------------------------------------------- bench


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: pFedLA's server memory, a federation's round time against its yardsticks",
        description="pfedla-memory: build pFedLA's server state for N clients of the tiny ViT (digits "
        "defaults) and run one round's server work for all N (θ̄_i, an HN step from a synthetic Δ, "
        "θ_i stored) without Flower; report each child's peak RSS and times as JSON. "
        "round: run the federation of --run-config (Ray simulation, 1 CPU per client), then time the "
        "model's pure compute (1 thread) and Flower's no-op floor for the same N and payload; report "
        "steady round time, bound, floor, ratios, per-message overhead, start-up, peak RSS as JSON "
        "(fields: docs/experiments.md, 'Simulation overhead benchmark').",
    )
    p.add_argument("bench", choices=("pfedla-memory", "round"), help="which benchmark")
    p.add_argument(
        "--clients", type=int, nargs="+", default=[20, 50, 100], metavar="N", help="pfedla-memory: sizes"
    )
    p.add_argument(
        "--overrides", default="", metavar="'k=v ...'", help="pfedla-memory: config overrides (dotted keys)"
    )
    _add_run_config_arg(p)
    p.add_argument("--app", type=Path, metavar="DIR", help="round: the app to run (default: this repo)")
    p.add_argument("--skip-floor", action="store_true", help="round: do not measure Flower's floor")
    p.add_argument("--skip-bound", action="store_true", help="round: do not measure the compute bound")
    p.add_argument(
        "--skip-scaling",
        action="store_true",
        help="round: do not time the steps with every core busy (the bound's all_cores_busy diagnostic)",
    )
    p.add_argument(
        "--supernodes",
        type=int,
        metavar="W",
        help="round: simulated SuperNodes (default: fedvit run's choice; an --app from before virtual "
        "clients needs one per client)",
    )
    p.add_argument(
        "--timeout", type=float, default=3600.0, metavar="S", help="round: limit of the run and of the floor"
    )
    p.add_argument(
        "--bound-seconds", type=float, default=8.0, metavar="S", help="round: timing of each step kind"
    )
    p.add_argument("--out", type=Path, metavar="FILE", help="also write the JSON report here")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "round":
        from fedvit.bench_round import REPO, round_bench

        bad_nodes = args.supernodes is not None and args.supernodes < 1
        if args.timeout <= 0 or args.bound_seconds <= 0 or bad_nodes:
            raise ConfigError("bench round: --timeout, --bound-seconds and --supernodes must be > 0")
        report = round_bench(
            _run_config(args),
            app_dir=args.app or REPO,
            skip_floor=args.skip_floor,
            skip_bound=args.skip_bound,
            scaling=not args.skip_scaling,
            supernodes=args.supernodes,
            timeout_s=args.timeout,
            bound_measure_s=args.bound_seconds,
            progress=_err,
        )
    else:
        from fedvit.bench import pfedla_memory

        if any(n < 1 for n in args.clients):
            raise ConfigError("bench: --clients must be >= 1")
        report = pfedla_memory(args.clients, overrides=args.overrides)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text, flush=True)
    return 0


# --------------------------------------------------------------------------- pretrain


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train a plain ViT centrally and save a state dict for model.pretrained",
        description="Train the config's ViT (plugins off) on the whole train split of its dataset and "
        "write {'model': state_dict} to --out; print a JSON summary (test accuracy, time).",
    )
    _add_run_config_arg(p)
    p.add_argument("--out", type=Path, required=True, metavar="FILE.pt", help="where to write the weights")
    p.add_argument("--epochs", type=int, default=1, help="epochs over the train split (default 1)")
    p.add_argument("--max-examples", type=int, metavar="N", help="a seeded subset of N training examples")
    p.add_argument(
        "--augment",
        default="auto",
        choices=["auto", "none", "crop", "crop-flip", "flip"],
        help="batch augmentation: random crop after padding, horizontal flip (default auto: crop, "
        "and flip RGB images only; never flip characters)",
    )
    p.add_argument("--crop-padding", type=int, default=4, metavar="PX", help="padding before the crop (4)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"], help="lr after warm-up")
    p.add_argument("--warmup", type=float, default=0.0, metavar="EPOCHS", help="linear warm-up epochs (0)")
    p.add_argument("--warmup-steps", type=int, metavar="N", help="linear warm-up steps (overrides --warmup)")
    p.add_argument("--min-lr", type=float, default=0.0, help="the cosine schedule's final lr (0)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing (0)")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="also write the resumable <out>.resume every N steps (always after each epoch)",
    )
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from fedvit.config import load_config
    from fedvit.pretrain import PretrainOptions, pretrain

    opts = PretrainOptions(
        epochs=args.epochs,
        max_examples=args.max_examples,
        augment=args.augment,
        crop_padding=args.crop_padding,
        schedule=args.schedule,
        warmup_epochs=args.warmup,
        warmup_steps=args.warmup_steps,
        min_lr=args.min_lr,
        label_smoothing=args.label_smoothing,
        checkpoint_every=args.checkpoint_every,
    )
    opts.validate()
    summary = pretrain(
        load_config(_run_config(args)),
        args.out,
        options=opts,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(json.dumps(summary, indent=2), flush=True)
    return 0


# --------------------------------------------------------------------------- export


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a client's personalized model as a self-contained file for local inference",
        description="Combine the run's checkpointed shared parameters with one client's private "
        "parameters (its state directory) into a torch.export program (.pt2) with the model config "
        "and preprocessing inside (torch.export.load alone loads it; see scripts/predict.py).",
    )
    p.add_argument("state_dir", type=Path, metavar="STATE_DIR", help="the client's state directory")
    p.add_argument("--run-dir", type=Path, metavar="DIR", help="the run directory (config.yaml, checkpoint/)")
    _add_run_config_arg(p)
    p.add_argument(
        "--checkpoint", type=Path, metavar="DIR", help="checkpoint directory (default RUN_DIR/checkpoint)"
    )
    p.add_argument("--client-id", type=int, metavar="ID", help="recorded in the export's metadata")
    p.add_argument(
        "--exit",
        type=int,
        metavar="DEPTH",
        help="early-exit models (anytime): cut the model at this exit depth (default: the client's tier)",
    )
    p.add_argument("-o", "--out", type=Path, required=True, metavar="FILE.pt2", help="where to write it")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from fedvit.export import export

    rc = _run_config(args) if args.run_config else None
    path = export(
        args.state_dir,
        args.out,
        run_dir=args.run_dir,
        run_config=rc,
        checkpoint=args.checkpoint,
        client_id=args.client_id,
        exit=args.exit,
    )
    print(path, flush=True)
    return 0


# --------------------------------------------------------------------------- alpha (pFedLA)


def _add_alpha(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "alpha",
        help="heatmaps of a pFedLA run's learned aggregation weights α",
        description="Plot <run dir>/alpha.npz (written by pFedLA / HeurpFedLA after every round): one "
        "clients × clients heatmap per aggregation layer, clients ordered by their most frequent label, "
        "beside the clients' label overlap; prints per layer the correlation of α with the overlap.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a pFedLA run directory (or its alpha.npz)")
    p.add_argument("-o", "--out", type=Path, metavar="FILE.png", help="default: <run dir>/alpha.png")
    p.add_argument("--used", action="store_true", help="α as used (HeurpFedLA's local layers one-hot)")
    p.set_defaults(func=_cmd_alpha)


def _cmd_alpha(args: argparse.Namespace) -> int:
    from fedvit.alpha_plot import (
        AlphaError,
        alpha_path,
        label_correlation,
        label_histograms,
        label_overlap,
        load_alpha,
        plot_alpha,
    )

    try:
        m = load_alpha(args.run_dir)
        out = plot_alpha(args.run_dir, args.out, used=args.used)
    except AlphaError as err:
        _err(f"error: {err}")
        return EXIT_CONFIG
    hists = label_histograms(alpha_path(args.run_dir).parent, m.num_clients)
    if hists is not None:
        corr = label_correlation(m, label_overlap(hists), used=args.used)
        print("layer\tr(α, label overlap)")
        for name, r in corr.items():
            print(f"{name}\t{r:.3f}")
    print(out, flush=True)
    return 0


# --------------------------------------------------------------------------- main

#: One function per subcommand; each registers its parser (see the module docstring).
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_run,
    _add_partition,
    _add_config,
    _add_report,
    _add_study,
    _add_bench,
    _add_pretrain,
    _add_export,
    _add_sweep,
    _add_alpha,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedvit",
        description="Personalized federated learning of Vision Transformers on Flower.",
        epilog="exit codes: 0 ok, 1 the run failed, 2 configuration error, 124 timeout, 130 interrupted",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedvit`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        _err(f"error: {err}")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # SIGTERM / SIGHUP during a run (after its teardown)
        code = exc.code if isinstance(exc.code, int) else 1
        if code >= 128:
            _err(f"terminated by signal {code - 128}")
        return code
    except Exception as err:  # machinery failures: one line, not a traceback
        from fedvit.runner import RunnerError

        if isinstance(err, RunnerError | OSError):
            _err(f"error: {err}")
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
