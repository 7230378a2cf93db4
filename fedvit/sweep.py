"""Sweeps: run-config values × seeds, one run directory each (``fedvit sweep``).

A sweep spec (a YAML file, or the same from the command line)::

    base:                     # run-config values every run starts from
      dataset: digits
      num-server-rounds: 20
      overrides: "model.depth=2"
    grid:                     # key: [values]; every combination is run
      method: [fedavg, fedper]
      train.lr: [0.001, 0.01] # dotted config keys go through `overrides`
    runs:                     # optional: explicit named combinations (crossed with the grid)
      - name: attn-private
        values: {method: fedavg, method.private: [attn]}
    seeds: [0, 1, 2]          # optional: each combination once per seed
    engine: inprocess         # simulation (flwr run, Ray; default) | inprocess
    out: outputs/my-sweep     # the sweep directory

Each run writes its normal run directory ``<out>/<name>/``; the name comes from the run's own
values (see :func:`run_name`), so the same values always give the same directory. A run whose
``results.json`` says ``completed`` is skipped; one with a checkpoint is continued from it
(``resume``); anything else left in its directory is removed and the run starts over. A failed
run does not stop the sweep. ``sweep.json`` (the manifest) is rewritten atomically after every
run, and at the end ``sweep.md`` / ``sweep.csv`` hold one row per combination of non-seed values:
mean ± std over seeds of the clients' mean test accuracy (last round and best-validation
round), the mean over seeds of the std over clients, and how many seeds are done.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fedvit.config import (
    CONF_DIR,
    OVERRIDES_KEY,
    RUN_CONFIG_KEYS,
    ConfigError,
    FedvitConfig,
    fingerprint,
    load_config,
    to_dict,
)

SCHEMA = "fedvit.sweep/1"
ENGINES = ("simulation", "inprocess")
SPEC_KEYS = ("base", "grid", "runs", "seeds", "engine", "out")
#: Run-config keys a sweep sets itself, and what to use instead.
RESERVED = {
    "seed": "use the sweep's seeds",
    "run-name": "the sweep names each run from its values",
    "output-dir": "the sweep's out directory holds the runs",
    "resume": "the sweep resumes interrupted runs itself",
}
MANIFEST, TABLE_MD, TABLE_CSV = "sweep.json", "sweep.md", "sweep.csv"
_SAFE = re.compile(r"[A-Za-z0-9._+-]+")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
MAX_NAME = 80  # longer readable names (before the seed) are cut and get a hash


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class NamedRun:
    """An explicit combination of values (``runs:`` in the spec)."""

    name: str
    values: dict[str, Any]


@dataclass
class SweepSpec:
    """A validated sweep: see the module docstring."""

    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    runs: list[NamedRun] = field(default_factory=list)
    seeds: list[int] | None = None
    engine: str = "simulation"
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "grid": self.grid,
            "runs": [{"name": r.name, "values": r.values} for r in self.runs],
            "seeds": self.seeds,
            "engine": self.engine,
            "out": self.out,
        }


def _check_key(key: Any, where: str) -> str:
    """A key of the run config or a dotted config key; reserved keys raise."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"sweep {where}: keys must be non-empty strings, got {key!r}")
    if key in RESERVED and not (key == "seed" and where == "base"):  # a base seed: all runs use it
        raise ConfigError(f"sweep {where}: '{key}' cannot be set here ({RESERVED[key]})")
    if key == OVERRIDES_KEY and where != "base":
        raise ConfigError(
            f"sweep {where}: '{OVERRIDES_KEY}' cannot be varied; use the dotted keys themselves"
        )
    if key not in RUN_CONFIG_KEYS and key != OVERRIDES_KEY and "." not in key:
        raise ConfigError(
            f"sweep {where}: unknown run-config key '{key}'; known keys: "
            f"{sorted([*RUN_CONFIG_KEYS, OVERRIDES_KEY])}, or a dotted config key (train.lr)"
        )
    return key


def _check_value(key: str, value: Any, where: str) -> Any:
    """A value a run config (scalars) or an override (scalars, lists) can carry."""
    if value is None or value == "":
        raise ConfigError(f"sweep {where}: '{key}' has an empty value")
    if isinstance(value, list) and "." in key:
        for item in value:
            _check_value(key, item, where)
        return value
    scalar = isinstance(value, bool | int | float | str)
    if not scalar or (isinstance(value, float) and not math.isfinite(value)):
        what = "a bool, number or string" + (" (or a list, for a dotted key)" if "." in key else "")
        raise ConfigError(f"sweep {where}: '{key}' must be {what}, got {value!r}")
    if "." in key and isinstance(value, str) and re.search(r"\s", value):
        raise ConfigError(f"sweep {where}: '{key}' = {value!r}: override values cannot hold whitespace")
    return value


def _mapping(data: Any, where: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"sweep {where}: must be a mapping, got {type(data).__name__}")
    return dict(data)


def spec_from_mapping(data: Mapping[str, Any]) -> SweepSpec:
    """Validate a spec given as a mapping (a parsed YAML file); every problem is a ConfigError."""
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"sweep spec: unknown key(s) {unknown}; known: {list(SPEC_KEYS)}")
    base = {_check_key(k, "base"): v for k, v in _mapping(data.get("base"), "base").items()}
    for key, value in base.items():
        if key == OVERRIDES_KEY:
            if not isinstance(value, str):
                raise ConfigError(f"sweep base: '{OVERRIDES_KEY}' must be a string, got {value!r}")
        else:
            _check_value(key, value, "base")
    grid: dict[str, list[Any]] = {}
    for key, values in _mapping(data.get("grid"), "grid").items():
        _check_key(key, "grid")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep grid: '{key}' needs a non-empty list of values, got {values!r}")
        seen: set[str] = set()
        for value in values:
            _check_value(key, value, "grid")
            canon = json.dumps(value, sort_keys=True)
            if canon in seen:
                raise ConfigError(f"sweep grid: '{key}' lists the value {value!r} twice")
            seen.add(canon)
        grid[key] = list(values)
    runs = _named_runs(data.get("runs"), set(grid))
    seeds = data.get("seeds")
    if seeds is not None:
        if (
            not isinstance(seeds, list)
            or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        ):
            raise ConfigError(f"sweep seeds: must be a non-empty list of integers >= 0, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"sweep seeds: {seeds} lists a seed twice")
        if "seed" in base:
            raise ConfigError("sweep base: 'seed' cannot be set together with seeds")
    engine = data.get("engine") or "simulation"
    if engine not in ENGINES:
        raise ConfigError(f"sweep engine: must be one of {ENGINES}, got {engine!r}")
    out = data.get("out")
    if out is not None and (not isinstance(out, str) or not out):
        raise ConfigError(f"sweep out: must be a directory path, got {out!r}")
    return SweepSpec(base, grid, runs, list(seeds) if seeds is not None else None, engine, out)


def _named_runs(data: Any, grid_keys: set[str]) -> list[NamedRun]:
    if data is None:
        return []
    if not isinstance(data, list) or not data:
        raise ConfigError(f"sweep runs: must be a non-empty list of {{name, values}}, got {data!r}")
    runs: list[NamedRun] = []
    for i, item in enumerate(data):
        where = f"runs[{i}]"
        item = _mapping(item, where)
        extra = sorted(set(item) - {"name", "values"})
        if extra:
            raise ConfigError(f"sweep {where}: unknown key(s) {extra}; a run has 'name' and 'values'")
        name = item.get("name")
        if not isinstance(name, str) or not _LABEL.fullmatch(name):
            raise ConfigError(
                f"sweep {where}: 'name' must be 1-64 characters of letters, digits, '.', '_', '+', '-' "
                f"(starting with a letter or digit), got {name!r}"
            )
        if any(r.name == name for r in runs):
            raise ConfigError(f"sweep {where}: the name '{name}' is used twice")
        values = {
            _check_key(k, where): _check_value(k, v, where)
            for k, v in _mapping(item.get("values"), where).items()
        }
        both = sorted(set(values) & grid_keys)
        if both:
            raise ConfigError(f"sweep {where}: {both} also in the grid; a key is set by the run or the grid")
        runs.append(NamedRun(name, values))
    return runs


def load_spec(path: Path | str) -> dict[str, Any]:
    """The mapping in a YAML spec file (validate it with :func:`spec_from_mapping`)."""
    from omegaconf import DictConfig, OmegaConf

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"sweep spec: no such file: {path}")
    try:
        cfg = OmegaConf.load(path)  # OmegaConf's YAML reads 1e-3 as a float, like the conf/ layers
    except Exception as err:
        raise ConfigError(f"sweep spec: cannot parse {path}: {err}") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"sweep spec: {path} must hold a mapping")
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def parse_value(text: str) -> Any:
    """One value from the command line: TOML scalars, ``[a,b]`` lists, else a bare string."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [parse_value(t) for t in _split_top(inner)] if inner else []
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += {"[": 1, "]": -1}.get(ch, 0)
        cur += ch
    parts.append(cur)
    return parts


def parse_grid_arg(text: str) -> tuple[str, list[Any]]:
    """``"method=fedavg,fedper"`` -> ``("method", ["fedavg", "fedper"])`` (``[a,b]`` is one list value)."""
    key, sep, rest = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--grid: expected key=value1,value2,..., got {text!r}")
    items = _split_top(rest)
    if any(not item.strip() for item in items):
        raise ConfigError(f"--grid: '{key}' has an empty value in {text!r}")
    return key, [parse_value(item) for item in items]


def spec_from_args(
    spec_file: Path | str | None,
    base: Mapping[str, Any] | None = None,
    grid: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    engine: str | None = None,
    out: Path | str | None = None,
) -> SweepSpec:
    """The spec file (if any) with the command line on top: ``base`` values win over the file's,
    each ``--grid`` replaces that key's values, ``seeds`` / ``engine`` / ``out`` replace theirs."""
    data = dict(load_spec(spec_file)) if spec_file else {}
    if base:
        data["base"] = {**_mapping(data.get("base"), "base"), **base}
    if grid:
        data["grid"] = dict(_mapping(data.get("grid"), "grid"))
        for arg in grid:
            key, values = parse_grid_arg(arg)
            data["grid"][key] = values
    if seeds is not None:
        data["seeds"] = list(seeds)
    if engine is not None:
        data["engine"] = engine
    if out is not None:
        data["out"] = str(out)
    return spec_from_mapping(data)


# --------------------------------------------------------------------------- runs and names


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
    """Every run of ``spec``: explicit runs × grid combinations × seeds (in that nesting)."""
    import itertools

    shorts = short_keys(spec.grid)
    combos = [dict(zip(spec.grid, vals, strict=True)) for vals in itertools.product(*spec.grid.values())]
    named: list[NamedRun | None] = list(spec.runs) or [None]
    runs: list[SweepRun] = []
    for nr in named:
        for grid_values in combos:
            label = nr.name if nr else None
            values = {**(nr.values if nr else {}), **grid_values}
            combo = run_name(label, grid_values, None, shorts)
            for seed in spec.seeds if spec.seeds is not None else [None]:
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
    rc = run_config(spec.base, run.values, name=run.name, out_dir=out_dir, seed=run.seed)
    try:
        cfg = load_config(rc)
    except ConfigError as err:
        raise ConfigError(f"sweep run '{run.name}': {err}") from err
    if cfg.clients.state_dir:
        rc = run_config(
            spec.base,
            run.values,
            name=run.name,
            out_dir=out_dir,
            seed=run.seed,
            state_dir=cfg.clients.state_dir,
        )
        cfg = load_config(rc)
    return rc, cfg


# --------------------------------------------------------------------------- engines

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


# --------------------------------------------------------------------------- running


@dataclass
class SweepOutcome:
    out_dir: Path
    runs: list[SweepRun]
    rows: list[dict[str, Any]]
    markdown: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def out_dir_of(spec: SweepSpec) -> Path:
    if not spec.out:
        raise ConfigError("sweep: no output directory; set 'out' in the spec or pass --out DIR")
    return Path(spec.out).expanduser().resolve()


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_diff(run_dir: Path, cfg: FedvitConfig) -> list[str]:
    """Config keys in which a finished run differs from what the sweep asks for now."""
    try:
        old = json.loads((run_dir / "results.json").read_text()).get("config") or {}
    except (OSError, ValueError):
        return []
    a, b = _flat(old), _flat(to_dict(cfg))
    ignore = ("server.resume", "output.")
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(ignore))


def _checkpoint_round(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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


def run_sweep(
    spec: SweepSpec,
    *,
    only: Collection[str] | None = None,
    run_fn: RunFn | None = None,
    app_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> SweepOutcome:
    """Run ``spec``'s runs (``only``: just these run names; the others are left as they are) and
    write ``sweep.json`` after every run and ``sweep.md`` / ``sweep.csv`` at the end. Every run's
    config is checked before anything runs (:class:`ConfigError`); failed runs are listed in the
    outcome, the others still run."""
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out_dir = out_dir_of(spec)
    runs = plan(spec)
    prepared = check(spec, only)
    if run_fn is None:
        run_fn = (
            run_inprocess
            if spec.engine == "inprocess"
            else make_simulation_runner(app_dir or CONF_DIR.parent)
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    old = _old_entries(out_dir)
    entries = {r.name: _entry(r, out_dir, old.get(r.name)) for r in runs}
    outcome = SweepOutcome(out_dir, runs, [], "")
    todo = [r for r in runs if r.name in prepared]
    write = lambda: _write_manifest(out_dir, spec, runs, entries)  # noqa: E731
    write()
    for i, r in enumerate(todo, 1):
        tag = f"[sweep {i}/{len(todo)}] {r.name}"
        rc, cfg = prepared[r.name]
        run_dir = out_dir / r.name
        entry = entries[r.name]
        if run_status(run_dir) == "completed":
            diff = _config_diff(run_dir, cfg)
            note = (
                f" (its config differs in {', '.join(diff)}; delete {run_dir} to run it again)"
                if diff
                else ""
            )
            say(f"{tag}: completed, skipped{note}")
            entry["action"] = "skipped"
            outcome.skipped.append(r.name)
            write()
            continue
        after = _checkpoint_round(run_dir)
        if after is not None:
            rc = {**rc, "resume": str(run_dir)}
            cfg = load_config(rc)
            say(f"{tag}: continuing from its checkpoint after round {after}")
        else:
            if run_dir.exists():  # started but never checkpointed: start over from nothing
                shutil.rmtree(run_dir)
                say(f"{tag}: no checkpoint; removed what was left and starting over")
            if cfg.clients.state_dir:  # this run's own subdirectory (see run_config)
                shutil.rmtree(Path(cfg.clients.state_dir).expanduser(), ignore_errors=True)
            say(f"{tag}: starting")
        entry.update(
            status="running",
            action="resumed" if after is not None else "fresh",
            resumed_after_round=after,
            message=None,
            wall_s=None,
        )
        write()
        t0 = time.monotonic()
        try:
            ok, msg = run_fn(rc, cfg)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM/SIGHUP in fedvit.runner
            entry.update(status="interrupted", wall_s=round(time.monotonic() - t0, 1))
            write()
            raise
        except Exception as err:  # the engine's machinery broke for this run: record it, go on
            ok, msg = False, f"{type(err).__name__}: {err}"
        wall = round(time.monotonic() - t0, 1)
        outcome.ran.append(r.name)
        if ok:
            entry.update(status="completed", wall_s=wall)
            say(f"{tag}: completed in {wall:.0f}s")
        else:
            entry.update(status="failed", wall_s=wall, message=msg)
            outcome.failed[r.name] = msg
            say(f"{tag}: FAILED: {msg}")
        write()
    outcome.rows = table_rows(out_dir, runs)
    outcome.markdown = table_markdown(outcome.rows, list(spec.grid), labels=bool(spec.runs))
    from fedvit.report import to_csv
    from fedvit.results import atomic_write_text

    atomic_write_text(out_dir / TABLE_MD, _document(spec, outcome))
    atomic_write_text(out_dir / TABLE_CSV, to_csv(outcome.rows))
    return outcome


def _old_entries(out_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        old = json.loads((out_dir / MANIFEST).read_text())
        return {e["name"]: e for e in old.get("runs", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _entry(run: SweepRun, out_dir: Path, old: Mapping[str, Any] | None) -> dict[str, Any]:
    """A run's manifest entry before this invocation touches it (status from its directory)."""
    status = run_status(out_dir / run.name)
    done = status == "completed"
    kept = old if done and old else {}  # what an earlier invocation recorded about this finished run
    return {
        "name": run.name,
        "combo": run.combo,
        "label": run.label,
        "values": run.grid_values,
        "run_values": run.values,
        "seed": run.seed,
        "status": "completed" if done else ("interrupted" if status else "pending"),
        "action": None,
        "wall_s": kept.get("wall_s"),
        "resumed_after_round": kept.get("resumed_after_round"),
        "message": None,
    }


def _write_manifest(
    out_dir: Path, spec: SweepSpec, runs: list[SweepRun], entries: Mapping[str, dict[str, Any]]
) -> None:
    from fedvit.results import atomic_write_text

    data = {
        "schema": SCHEMA,
        "updated_at": datetime.now().isoformat(timespec="seconds"),
        "spec": {**spec.to_dict(), "out": str(out_dir)},
        "runs": [entries[r.name] for r in runs],
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(data, indent=1, default=str))


# --------------------------------------------------------------------------- the table


def table_rows(out_dir: Path, runs: Sequence[SweepRun]) -> list[dict[str, Any]]:
    """One row per combination of non-seed values (in plan order): its values, then
    :func:`fedvit.report.over_seeds` of its completed runs' results, and the seeds planned."""
    from fedvit.report import ReportError, load_run, over_seeds

    groups: dict[str, list[SweepRun]] = {}
    for r in runs:
        groups.setdefault(r.combo, []).append(r)
    rows = []
    for combo, members in groups.items():
        results = []
        for r in members:
            try:
                data = load_run(out_dir / r.name)
            except ReportError:
                continue
            if data.get("status") == "completed":
                results.append(data)
        first = members[0]
        rows.append(
            {
                "combo": combo,
                **({"run": first.label} if first.label is not None else {}),
                **{k: display_value(v) for k, v in first.grid_values.items()},
                "seeds_total": len(members),
                **over_seeds(results),
            }
        )
    return rows


def display_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(display_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def table_markdown(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], labels: bool) -> str:
    from fedvit.report import seeds_markdown

    columns = ([("run", "run")] if labels else []) + [(k, k) for k in keys]
    return seeds_markdown(rows, columns or [("combo", "run")])


def _document(spec: SweepSpec, outcome: SweepOutcome) -> str:
    from fedvit.runner import format_run_config

    n_runs = len(outcome.runs)
    n_done = sum(r.get("seeds_done", 0) for r in outcome.rows)
    head = (
        f"# Sweep: {len(outcome.rows)} combination(s) × {len(spec.seeds) if spec.seeds else 1} seed(s), "
        f"{n_done}/{n_runs} runs completed\n\n"
        f"Base run config: `{format_run_config(spec.base) or '(defaults)'}`\n\n"
        "Client top-1 test accuracy in %: the mean over clients (unweighted) at the last round and at "
        "the round with the best mean validation accuracy, each as mean ± std over seeds (sample std; "
        "none with one seed); std over clients: its mean over seeds (last round); seeds: completed / "
        "planned.\n\n"
    )
    return head + outcome.markdown


def report_sweep(sweep_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """The table of a sweep directory from its ``sweep.json`` and its runs' ``results.json`` now."""
    path = Path(sweep_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
        spec = data["spec"]
        runs = [
            SweepRun(
                e["name"], e["combo"], e.get("label"), e.get("run_values", {}), e["values"], e.get("seed")
            )
            for e in data["runs"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a readable sweep manifest ({err})") from err
    rows = table_rows(Path(sweep_dir), runs)
    return rows, table_markdown(rows, list(spec.get("grid") or {}), labels=bool(spec.get("runs")))
