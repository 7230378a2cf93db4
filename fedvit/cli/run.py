"""``fedvit run``, ``fedvit partition`` and ``fedvit config``: one federation, its data split and
its resolved configuration."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fedvit.cli.common import add_run_config_arg, eprint, run_config

# --------------------------------------------------------------------------- run


def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a federation with flwr run; fails loudly",
        description="Run the app with `flwr run` on a private, throwaway SuperLink (or on --superlink), "
        "stream its log, and exit non-zero unless it ends as finished:completed. The config is "
        "validated here first; relative paths are made absolute against the current directory.",
    )
    p.add_argument("app_dir", nargs="?", default=".", metavar="APP_DIR", help="Flower app (default: .)")
    add_run_config_arg(p)
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
        run_config(args),
        num_supernodes=num,
        cpus_per_client=cpus,
        gpus_per_client=gpus,
        federation_config_extra=fed_extra,
        superlink=args.superlink,
        ray_address=args.ray_address,
        flwr_home=args.flwr_home,
        timeout_s=args.timeout,
        stream=not args.quiet,
        progress=None if args.quiet else eprint,
    )
    if outcome.ok:
        print(describe(outcome), flush=True)
        return 0
    # Streamed logs already showed the end of the run; a quiet run shows its tail now.
    eprint(describe(outcome, log_lines=25 if args.quiet else 0))
    return outcome.returncode or 1


def _kv(values: list[str] | None, what: str) -> dict[str, Any]:
    from fedvit.runner import load_kv_args

    return load_kv_args(values, what)


# --------------------------------------------------------------------------- partition


def add_partition(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "partition",
        help="preview how the data is split over clients",
        description="Build (or load from cache) the partition of a config and print per-client split "
        "sizes and label histograms.",
    )
    add_run_config_arg(p)
    p.add_argument("--top", type=int, default=4, help="most frequent labels shown per client (default 4)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.set_defaults(func=_cmd_partition)


def _cmd_partition(args: argparse.Namespace) -> int:
    from fedvit.config import load_config
    from fedvit.data import describe_protocol, format_partition_table, summarize_partition
    from fedvit.preflight import check

    cfg = load_config(run_config(args))
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


def add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="print the resolved configuration",
        description="Compose the YAML layers and the run config, validate, and print the result.",
    )
    add_run_config_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p.set_defaults(func=_cmd_config)


def _cmd_config(args: argparse.Namespace) -> int:
    from fedvit.config import load_config, to_dict, to_yaml

    cfg = load_config(run_config(args))
    if args.json:
        print(json.dumps(to_dict(cfg), indent=2))
    else:
        print(to_yaml(cfg), end="")
    return 0
