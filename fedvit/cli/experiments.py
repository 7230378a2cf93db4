"""``fedvit study``, ``fedvit sweep`` and ``fedvit bench``: many federations, or measurements of one."""

from __future__ import annotations

import argparse
from collections.abc import Collection
from pathlib import Path

from fedvit.cli.common import add_run_config_arg, eprint, print_report, run_config
from fedvit.cli.plugins import commands as method_commands
from fedvit.config import ConfigError

# --------------------------------------------------------------------------- study


def add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="the 'where to personalize' study: one federation per private layer type",
        description="Run, with one base config, one federation per choice of private parameters "
        "(each layer type alone and with the head, all-local, all-global) and write study.md and "
        "study.csv (client accuracy mean ± std; overall = mean of stand-alone and combined).",
    )
    p.add_argument("study", choices=("where-to-personalize",), help="which study")
    add_run_config_arg(p)
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
        run_config(args),
        output_dir=args.output_dir,
        engine=args.engine,
        only=args.only,
        resume=args.resume,
        progress=eprint,
    )
    return _tell(to_markdown(outcome.rows), f"study: {outcome.study_dir / 'study.md'}", outcome.failed)


def _tell(table: str, where: str, failed: Collection[str]) -> int:
    """Print a study's or sweep's table and where it is written; exit 1, naming them, if runs failed."""
    print(table, end="", flush=True)
    print(where, flush=True)
    if failed:
        eprint(f"error: {len(failed)} run(s) failed: {', '.join(failed)}")
        return 1
    return 0


# --------------------------------------------------------------------------- sweep


def add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="a grid of run-config values × seeds, one run directory each, one table over seeds",
        description="Run every combination of a sweep spec (YAML: base, grid, runs, seeds, engine, out, "
        "jobs; or the same from the command line, which wins over the file) in its own directory named "
        "from its values, one after another or --jobs at once; skip completed runs, continue interrupted "
        "ones from their checkpoint; a failed run does not stop the others (exit 1 at the end). Writes "
        "sweep.json after every run starts and ends, then "
        "sweep.md / sweep.csv: mean ± std over seeds of the clients' mean test accuracy. "
        "See docs/configuration.md, 'Sweeps'.",
    )
    p.add_argument("spec", nargs="?", type=Path, metavar="SPEC.yaml", help="the sweep spec (optional)")
    add_run_config_arg(p)  # the base values
    p.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2,...",
        help='one grid key and its values, e.g. "method=fedavg,fedper" or '
        '"method.private=[attn],[head]"; repeatable; run-config keys or dotted config keys',
    )
    p.add_argument("--seeds", type=int, nargs="+", metavar="N", help="run every combination once per seed")
    p.add_argument(
        "--engine", choices=("simulation", "inprocess"), help="default: the spec's, else simulation"
    )
    p.add_argument("--out", type=Path, metavar="DIR", help="the sweep directory (default: the spec's out)")
    p.add_argument(
        "--jobs",
        metavar="N",
        help="runs at once (default: the spec's jobs, else 1); N > 1 needs --engine inprocess and runs "
        "each in its own process with one thread, its output in <out>/<run>/run.log",
    )
    p.add_argument("--dry-run", action="store_true", help="check every run's config and list the runs only")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fedvit.sweep import out_dir_of, plan, run_sweep, spec_from_args

    spec = spec_from_args(
        args.spec,
        base=run_config(args) if args.run_config else None,
        grid=args.grid,
        seeds=args.seeds,
        engine=args.engine,
        out=args.out,
        jobs=args.jobs,
    )
    if args.dry_run:
        from fedvit.sweep import check

        out = out_dir_of(spec)
        check(spec)
        for r in plan(spec):
            print(out / r.name, flush=True)
        return 0
    outcome = run_sweep(spec, progress=eprint)
    return _tell(outcome.markdown, f"sweep: {outcome.out_dir / 'sweep.md'}", outcome.failed)


# --------------------------------------------------------------------------- bench


def add_bench(sub: argparse._SubParsersAction) -> None:
    methods = method_commands("bench")  # the methods' own benchmarks, e.g. pFedLA's pfedla-memory
    p = sub.add_parser(
        "bench",
        help="benchmarks: a federation's round time against its yardsticks; the methods' own "
        f"({', '.join(methods)})",
        description="round: run the federation of --run-config (Ray simulation, 1 CPU per client), then "
        "time the model's pure compute (1 thread) and Flower's no-op floor for the same N and payload; "
        "report steady round time, bound, floor, ratios, per-message overhead, start-up, peak RSS as JSON "
        "(fields: docs/experiments.md, 'Simulation overhead benchmark'). "
        + " ".join(f"{name}: {help} (fedvit bench {name} -h)." for name, help in methods.items()),
    )
    p.add_argument("bench", choices=("round", *methods), help="which benchmark")
    add_run_config_arg(p)
    p.add_argument("--app", type=Path, metavar="DIR", help="round: the app to run (default: this repo)")
    p.add_argument("--skip-floor", action="store_true", help="round: do not measure Flower's floor")
    p.add_argument("--skip-bound", action="store_true", help="round: do not measure the compute bound")
    p.add_argument(
        "--skip-scaling",
        action="store_true",
        help="round: do not time the steps with every core busy (the bound's all_cores_busy diagnostic)",
    )
    p.add_argument(
        "--no-ray-head",
        action="store_true",
        help="round: let Flower start the simulation's Ray instance after the ServerApp, as `flwr run` "
        "does, instead of fedvit run's private Ray head started beside the SuperLink",
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
    p.add_argument(
        "--bound-repeats",
        type=int,
        default=3,
        metavar="N",
        help="round: alternate the two timings N times, each kind keeping its fastest (default 3)",
    )
    p.add_argument("--out", type=Path, metavar="FILE", help="also write the JSON report here")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.bench != "round":  # a method's: `fedvit bench <name> ...` runs it (fedvit.cli.plugins)
        raise ConfigError(f"bench {args.bench}: its options go after its name (fedvit bench {args.bench} -h)")
    from fedvit.bench_round import REPO, round_bench

    bad_nodes = args.supernodes is not None and args.supernodes < 1
    if args.timeout <= 0 or args.bound_seconds <= 0 or args.bound_repeats < 1 or bad_nodes:
        raise ConfigError(
            "bench round: --timeout, --bound-seconds, --bound-repeats and --supernodes must be > 0"
        )
    report = round_bench(
        run_config(args),
        app_dir=args.app or REPO,
        skip_floor=args.skip_floor,
        skip_bound=args.skip_bound,
        scaling=not args.skip_scaling,
        private_ray_head=not args.no_ray_head,
        supernodes=args.supernodes,
        timeout_s=args.timeout,
        bound_measure_s=args.bound_seconds,
        bound_repeats=args.bound_repeats,
        progress=eprint,
    )
    return print_report(report, args.out)
