"""Running one federation of a sweep (the engines) and reading what a run left in its directory:
its ``results.json`` status, its checkpoint's round, the config it ran with."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedvit.config import FedvitConfig, to_dict
from fedvit.launch.runconfig import PATH_DOTKEYS

#: ``(run_config, cfg) -> (ok, message)``: runs one federation to its end.
RunFn = Callable[[dict[str, Any], FedvitConfig], tuple[bool, str]]


def run_status(run_dir: Path) -> str | None:
    """``status`` of ``run_dir/results.json`` (None: no readable results)."""
    try:
        return json.loads((Path(run_dir) / "results.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def run_inprocess(run_config: dict[str, Any], cfg: FedvitConfig) -> tuple[bool, str]:
    """One federation in this process (InProcessGrid + the ServerApp's ``run``)."""
    from fedvit.inprocess import InProcessGrid
    from fedvit.server_app import run

    try:
        run_dir = run(InProcessGrid(run_config, cfg.clients.num_clients), cfg)
    except Exception as err:  # one failed run does not stop the sweep
        return False, f"{type(err).__name__}: {err}"
    status = run_status(run_dir)
    return status == "completed", f"status {status}"


def make_simulation_runner(app_dir: Path, quiet: bool = True) -> RunFn:
    """One federation with ``flwr run`` in Flower's Ray simulation (:func:`fedvit.runner.run_flwr`)."""

    def run_one(run_config: dict[str, Any], cfg: FedvitConfig) -> tuple[bool, str]:
        from fedvit.runner import describe, run_flwr

        outcome = run_flwr(app_dir, run_config, gpus_per_client=None, stream=not quiet)
        return outcome.ok, describe(outcome, log_lines=0 if outcome.ok else 10)

    return run_one


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(run_dir: Path, cfg: FedvitConfig) -> list[str]:
    """Config keys in which a finished run differs from what the sweep asks for now."""
    try:
        old = json.loads((run_dir / "results.json").read_text()).get("config") or {}
    except (OSError, ValueError):
        return []
    a, b = _flat(old), _flat(to_dict(cfg))
    ignore = ("server.resume", "output.")
    return sorted(
        k
        for k in set(a) | set(b)
        if _as_run(k, a.get(k)) != _as_run(k, b.get(k)) and not k.startswith(ignore)
    )


def _as_run(key: str, value: Any) -> Any:
    """A local path as a run records it (absolute: ``fedvit run`` makes run-config paths absolute
    against the caller's directory), so ``data-dir='../shared/data'`` in a spec is not reported as
    differing from the ``/abs/shared/data`` a finished run holds."""
    if key in PATH_DOTKEYS and isinstance(value, str) and value:
        return str(Path(value).expanduser().resolve())
    return value


def checkpoint_round(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
