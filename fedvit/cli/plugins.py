"""The subcommands methods bring (``@register_command`` in ``strategies/`` or ``clients/``).

The core CLI knows them by name and help line only (:func:`fedvit.registry.declared`
``("command")``, read from source: no method module is imported to build the parser, so
``fedvit --help`` and ``fedvit config`` stay fast). A one-word name is a top-level subcommand
(``fedvit alpha``); ``"<group> <word>"`` is a choice of a core group's positional (``fedvit bench
pfedla-memory``, listed by ``fedvit bench``). :func:`match` finds one at the start of the
command line and :func:`fedvit.registry.run_command` imports its module and hands it the rest.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from fedvit.registry import declared, run_command


def commands(group: str = "") -> dict[str, str]:
    """The method commands of ``group`` (``""``: top level): word -> help line."""
    prefix = f"{group} " if group else ""
    return {
        name[len(prefix) :]: where.help
        for name, where in sorted(declared("command").items())
        if name.startswith(prefix) and " " not in name[len(prefix) :]
    }


def match(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """``(command name, its arguments)`` when ``argv`` starts with a method command's name."""
    names = declared("command")
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in names:
            return name, list(argv[words:])
    return None


def adders() -> list[Callable[[argparse._SubParsersAction], None]]:
    """One parser-registering function per top-level method command (help line, its arguments
    passed through untouched to the method's own parser)."""
    return [_adder(word, help) for word, help in commands().items()]


def _adder(word: str, help: str) -> Callable[[argparse._SubParsersAction], None]:
    def add(sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser(word, help=help, add_help=False, description=f"{help} (see 'fedvit {word} -h')")
        p.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=lambda args: run_command(word, list(args.argv)))

    return add
