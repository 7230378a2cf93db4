"""`flwr run` of a fedvit app collects the app's files without walking what Flower drops anyway,
and builds the very same FAB (fedvit.launch.fab)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_files
from flwr.cli.utils import collect_files

from fedvit.launch.fab import collect_app_files

REPO = Path(__file__).resolve().parents[1]
#: Flower builds its path specs with pathspec's deprecated 'gitwildmatch' (hundreds of warnings)
pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")


def _app(root: Path, gitignore: str) -> Path:
    """A copy of this repo's app files plus what a user's checkout holds besides them."""
    app = root / "app"
    (app / "fedvit" / "sub" / "__pycache__").mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", app / "pyproject.toml")
    (app / "README.md").write_text("# app\n")
    (app / ".gitignore").write_text(gitignore)
    (app / "fedvit" / "__init__.py").write_text("")
    (app / "fedvit" / "sub" / "m.py").write_text("X = 1\n")
    (app / "fedvit" / "sub" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\0")
    for pkg in ("strategies", "clients"):
        (app / pkg).mkdir()
        (app / pkg / "one.py").write_text("")
    (app / "conf").mkdir()
    (app / "conf" / "a.yaml").write_text("a: 1\n")
    for heavy in (".venv/lib/site-packages/pkg", "outputs/run-1", ".flwr/apps", "deep/outputs/x"):
        (app / heavy).mkdir(parents=True)
        (app / heavy / "mod.py").write_text("Y = 2\n")
    (app / "outputs" / "keep.py").write_text("Z = 3\n")
    (app / "linked").symlink_to(app / "conf", target_is_directory=True)  # never followed
    return app


def _fab(files: dict[str, Path]) -> bytes:
    return build_fab_from_files(files)[0]


@pytest.mark.parametrize(
    "gitignore",
    [
        ".venv/\n__pycache__/\noutputs/\n",
        "outputs\n*.pyc\n",  # a directory pattern without the slash
        "outputs/\n!outputs/keep.py\n",  # a negation: nothing pruned by the .gitignore
        "",
    ],
)
def test_the_fab_is_flowers_byte_for_byte(tmp_path: Path, gitignore: str) -> None:
    app = _app(tmp_path, gitignore)
    ours, flowers = collect_app_files(app), collect_files(app)
    assert _fab(ours) == _fab(flowers)
    assert set(ours) <= set(flowers)
    assert not any(p.startswith((".venv/", ".flwr/")) or "__pycache__" in p for p in ours)  # never walked
    if gitignore.startswith(".venv/"):
        assert not any(p.startswith("outputs/") for p in ours) and "deep/outputs/x/mod.py" not in ours


def test_the_repos_own_fab_is_flowers_and_skips_its_venv() -> None:
    ours, flowers = collect_app_files(REPO), collect_files(REPO)
    assert _fab(ours) == _fab(flowers)
    assert not any(p.startswith(".venv/") for p in ours)


def test_a_primed_flwr_cli_collects_with_it() -> None:
    code = (
        "from fedvit.launch.session import _PRIMED_FLWR\n"
        "exec(_PRIMED_FLWR.split('line = sys.stdin')[0])\n"
        "import flwr.cli.build as b\n"
        "from fedvit.launch.fab import collect_app_files\n"
        "print(b.collect_files is collect_app_files)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "True"
