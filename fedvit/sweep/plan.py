"""A sweep's runs: every combination of its spec's values and seeds (:func:`plan`), the directory
name of each (:func:`run_name`: the same values always give the same name) and its run config
(:func:`run_config`), checked before anything runs (:func:`check`)."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedvit.config import OVERRIDES_KEY, ConfigError, FedvitConfig, fingerprint, load_config
from fedvit.sweep.spec import NamedRun, SweepSpec, out_dir_of, parse_value

_SAFE = re.compile(r"[A-Za-z0-9._+-]+")
MAX_NAME = 80  # longer readable names (before the seed) are cut and get a hash


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep."""

    name: str  # its directory under the sweep directory
    combo: str  # the name without the seed: the table's row
    label: str | None  # the explicit run's name, if any
    values: dict[str, Any]  # the explicit run's values, then the grid's (no seed)
    grid_values: dict[str, Any]
    seed: int | None


def _render(value: Any) -> tuple[str, bool]:
    """(value for a directory name, exact): exact when the text names only this value."""
    if isinstance(value, bool):
        return ("true" if value else "false"), True
    if isinstance(value, int | float):
        return repr(value), True
    if isinstance(value, list):
        return ("+".join(_render(v)[0] for v in value) or "none"), False
    text = str(value)
    exact = bool(_SAFE.fullmatch(text)) and isinstance(parse_value(text), str)
    return (text if exact else re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "x"), exact


def short_keys(keys: Collection[str]) -> dict[str, str]:
    """Each key's name in directory names: a dotted key's last part unless another key shares it."""
    last = {k: k.rsplit(".", 1)[-1] for k in keys}
    clash = {s for s in last.values() if list(last.values()).count(s) > 1 or s in keys}
    return {k: (k if "." not in k or last[k] in clash else last[k]) for k in keys}


def run_name(
    label: str | None, grid_values: Mapping[str, Any], seed: int | None, shorts: Mapping[str, str]
) -> str:
    """``[label,]key=value,...[,seed=N]`` with the keys sorted. Values that do not spell out
    exactly (lists, strings with odd characters), and a part before the seed longer than
    :data:`MAX_NAME` characters, get ``~<hash of the label and values>`` before the seed (the
    readable part cut short if need be), so names stay distinct, filesystem-safe and short."""
    parts = [label] if label else []
    exact = True
    for key in sorted(grid_values):
        text, ok = _render(grid_values[key])
        exact = exact and ok
        parts.append(f"{shorts.get(key, key)}={text}")
    body = ",".join(parts) or "base"
    tail = f",seed={seed}" if seed is not None else ""
    if not exact or len(body) > MAX_NAME:
        digest = fingerprint({"label": label, "values": dict(grid_values)})[:8]
        body = f"{body[: MAX_NAME - 9].rstrip(',=')}~{digest}"
    return body + tail


def plan(spec: SweepSpec) -> list[SweepRun]:
    """Every run of ``spec``: seeds × explicit runs × grid combinations, in that nesting, so a
    batch cut short has every method at the first seed before any method at the second (a
    complete one-seed table first, not three seeds of a few methods)."""
    import itertools

    shorts = short_keys(spec.grid)
    combos = [dict(zip(spec.grid, vals, strict=True)) for vals in itertools.product(*spec.grid.values())]
    named: list[NamedRun | None] = list(spec.runs) or [None]
    runs: list[SweepRun] = []
    for seed in spec.seeds if spec.seeds is not None else [None]:
        for nr in named:
            for grid_values in combos:
                label = nr.name if nr else None
                values = {**(nr.values if nr else {}), **grid_values}
                combo = run_name(label, grid_values, None, shorts)
                name = run_name(label, grid_values, seed, shorts)
                runs.append(SweepRun(name, combo, label, values, grid_values, seed))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):  # only a hash collision could do this
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"sweep: two runs got the same directory name '{dup}'")
    return runs


def _dot_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_dot_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def run_config(
    base: Mapping[str, Any],
    values: Mapping[str, Any],
    *,
    name: str,
    out_dir: Path,
    seed: int | None = None,
    state_dir: str | None = None,
) -> dict[str, Any]:
    """The run config of one run: ``base`` with ``values`` on top (run-config keys replace,
    dotted keys are appended to ``overrides`` after the base's), its seed, its run name and the
    sweep directory as output directory. ``state_dir``: the config's ``clients.state_dir``, if
    any; the run gets its own subdirectory ``<state_dir>/<name>`` (runs of one sweep often share
    method, model and dataset, so their private states would collide)."""
    rc: dict[str, Any] = {}
    dotted: list[str] = []
    for key, value in [*base.items(), *values.items()]:
        if key == OVERRIDES_KEY:
            dotted.extend(str(value or "").split())
        elif "." in key:
            dotted.append(f"{key}={_dot_value(value)}")
        elif key not in ("run-name", "output-dir", "resume"):
            rc[key] = value
    if state_dir:
        dotted.append(f"clients.state_dir={Path(state_dir) / name}")
    if dotted:
        rc[OVERRIDES_KEY] = " ".join(dotted)
    if seed is not None:
        rc["seed"] = seed
    rc["run-name"] = name
    rc["output-dir"] = str(out_dir)
    return rc


def _prepare(spec: SweepSpec, run: SweepRun, out_dir: Path) -> tuple[dict[str, Any], FedvitConfig]:
    """A run's config, checked (and with its own state directory when the config sets one)."""

    def configs(state_dir: str | None = None) -> tuple[dict[str, Any], FedvitConfig]:
        rc = run_config(
            spec.base, run.values, name=run.name, out_dir=out_dir, seed=run.seed, state_dir=state_dir
        )
        return rc, load_config(rc)

    try:
        rc, cfg = configs()
    except ConfigError as err:
        raise ConfigError(f"sweep run '{run.name}': {err}") from err
    if cfg.clients.state_dir:
        rc, cfg = configs(cfg.clients.state_dir)
    return rc, cfg


# --------------------------------------------------------------------------- engines

#: ``(run_config, cfg) -> (ok, message)``: runs one federation to its end.


def check(
    spec: SweepSpec, only: Collection[str] | None = None
) -> dict[str, tuple[dict[str, Any], FedvitConfig]]:
    """Every run's (``only``: these runs') run config and resolved config, by run name; the first
    bad one raises :class:`ConfigError` naming the run."""
    out_dir = out_dir_of(spec)
    runs = plan(spec)
    if only is not None:
        unknown = sorted(set(only) - {r.name for r in runs})
        if unknown:
            raise ConfigError(f"sweep: no run named {unknown}")
    return {r.name: _prepare(spec, r, out_dir) for r in runs if only is None or r.name in only}
