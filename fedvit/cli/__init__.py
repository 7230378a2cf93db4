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

Adding a subcommand: in the module of its group (:mod:`~fedvit.cli.run`: one federation;
:mod:`~fedvit.cli.experiments`: many, or measurements; :mod:`~fedvit.cli.artifacts`: what runs
leave and the models that go in and out) write ``add_<name>(subparsers)`` that registers its parser
and sets ``func`` (a ``(args) -> int`` handler) with ``set_defaults``, and append it to
:data:`COMMANDS`. Handlers import what they need lazily, so ``fedvit config`` stays fast; raise
:class:`~fedvit.config.ConfigError` for user errors (shared helpers: :mod:`~fedvit.cli.common`).
A subcommand that belongs to one method (``alpha``, ``bench pfedla-memory``: pFedLA's) lives with
the method instead, declared with :func:`fedvit.registry.register_command` (:mod:`~fedvit.cli.plugins`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fedvit.cli import plugins
from fedvit.cli.artifacts import add_export, add_pretrain, add_report
from fedvit.cli.common import EXIT_CONFIG, EXIT_INTERRUPTED, eprint
from fedvit.cli.experiments import add_bench, add_study, add_sweep
from fedvit.cli.run import add_config, add_partition, add_run
from fedvit.config import ConfigError
from fedvit.registry import run_command

__all__ = ["COMMANDS", "EXIT_CONFIG", "EXIT_INTERRUPTED", "build_parser", "main"]

#: One function per subcommand; each registers its parser (see the module docstring).
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_run,
    add_partition,
    add_config,
    add_report,
    add_study,
    add_bench,
    add_pretrain,
    add_export,
    add_sweep,
    *plugins.adders(),  # the methods' own subcommands (fedvit alpha)
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
    method_command = plugins.match(sys.argv[1:] if argv is None else argv)
    if method_command is None:
        args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) if method_command is None else run_command(*method_command))
    except ConfigError as err:
        eprint(f"error: {err}")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        eprint("interrupted")
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # SIGTERM / SIGHUP during a run (after its teardown)
        code = exc.code if isinstance(exc.code, int) else 1
        if code >= 128:
            eprint(f"terminated by signal {code - 128}")
        return code
    except Exception as err:  # machinery failures: one line, not a traceback
        from fedvit.runner import RunnerError

        if isinstance(err, RunnerError | OSError):
            eprint(f"error: {err}")
            return 1
        raise
