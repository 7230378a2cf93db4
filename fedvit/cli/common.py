"""What every subcommand shares: its exit codes, its one-line messages, ``--run-config``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


def eprint(msg: str) -> None:
    """``fedvit: <msg>`` on stderr, flushed (errors and progress lines)."""
    print(f"fedvit: {msg}", file=sys.stderr, flush=True)


def add_run_config_arg(parser: argparse.ArgumentParser) -> None:
    """The repeatable ``-c/--run-config`` option."""
    parser.add_argument(
        "-c",
        "--run-config",
        action="append",
        metavar="'k=v ...'|FILE.toml",
        help="run-config overrides in Flower's syntax, e.g. \"method='fedper' num-server-rounds=5\" "
        "or a .toml file; repeatable, later values win",
    )


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--run-config`` values of ``args`` merged (later ones win)."""
    from fedvit.launch.runconfig import load_kv_args  # not fedvit.runner: its process machinery

    return load_kv_args(args.run_config, "run-config")


def print_report(report: dict[str, Any], out: Path | None) -> int:
    """Print a benchmark's JSON report (and write it to ``out`` too, when given); exit code 0."""
    text = json.dumps(report, indent=2)
    if out:
        out.write_text(text + "\n")
    print(text, flush=True)
    return 0
