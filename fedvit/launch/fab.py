"""The files of a Flower app, collected as Flower's ``flwr run`` does, without walking the
directories whose files Flower's rules drop anyway.

``flwr run`` builds the app's FAB in the CLI: ``flwr.cli.utils.collect_files`` walks the whole app
directory and resolves every file, *then* drops what the publish rules exclude (``.venv/**``,
``.flwr/**``, ``**/__pycache__/**``) and what the app's ``.gitignore`` ignores. With the README's
``.venv`` inside the repository that is ~53,000 files: 3.7 s of every ``fedvit run`` on this
machine (``docs/experiments.md``, issue 14). :func:`collect_app_files` does not enter those
directories; the rest (symlinks skipped, files resolving outside the app skipped) is Flower's,
and the FAB comes out byte for byte the same (``tests/test_runner.py``).

The primed ``flwr`` CLI (:class:`fedvit.launch.session.PrimedFlwr`) installs it with
:func:`install` before running ``flwr run``. Import-light: only Flower's CLI helpers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathspec import PathSpec

#: Directories whose every file Flower's publish rules exclude (``APP_PUBLISH_EXCLUDE_PATTERNS``):
#: at the app's top level, and at any depth.
TOP_LEVEL_DROPPED = frozenset({".venv", ".flwr"})
ANY_LEVEL_DROPPED = frozenset({"__pycache__"})


def _ignored_dir_spec(root: Path) -> PathSpec | None:
    """The app's ``.gitignore`` as Flower reads it, for directories; ``None`` when it has a
    negation (``!pattern``), which could bring back a file below an ignored directory."""
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns

    patterns = load_gitignore_patterns(root / ".gitignore")
    if any(p.startswith("!") for p in patterns):
        return None
    return build_pathspec(patterns)


def collect_app_files(root: Path) -> dict[str, Path]:
    """``flwr.cli.utils.collect_files(root)``, minus files under directories whose files Flower
    drops whatever they are (see the module doc)."""
    resolved_root = root.resolve()
    ignored = _ignored_dir_spec(root)
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        kept = []
        for name in dirnames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if name in ANY_LEVEL_DROPPED or (rel_dir == "." and name in TOP_LEVEL_DROPPED):
                continue
            if ignored is not None and ignored.match_file(f"{rel}/"):
                continue
            kept.append(name)
        dirnames[:] = kept
        for filename in filenames:
            path = here / filename
            if path.is_symlink():
                continue
            if not path.resolve().is_relative_to(resolved_root):
                continue
            files[path.relative_to(root).as_posix()] = path
    return files


def install() -> None:
    """Make this process's ``flwr run`` collect the app's files with :func:`collect_app_files`."""
    import flwr.cli.build as build

    build.collect_files = collect_app_files
