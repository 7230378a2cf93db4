"""A sweep's spec: what ``fedvit sweep`` is asked to run (``base``, ``grid``, ``runs``, ``seeds``,
``engine``, ``out``, ``jobs``; see :mod:`fedvit.sweep`), read from a YAML file or the command line and
checked key by key: every problem is a :class:`~fedvit.config.ConfigError` naming it."""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedvit.config import OVERRIDES_KEY, RUN_CONFIG_KEYS, ConfigError

ENGINES = ("simulation", "inprocess")
SPEC_KEYS = ("base", "grid", "runs", "seeds", "engine", "out", "jobs")
#: Run-config keys a sweep sets itself, and what to use instead.
RESERVED = {
    "seed": "use the sweep's seeds",
    "run-name": "the sweep names each run from its values",
    "output-dir": "the sweep's out directory holds the runs",
    "resume": "the sweep resumes interrupted runs itself",
}
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


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
    jobs: int = 1  # runs at once (each in its own process; inprocess engine only)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "grid": self.grid,
            "runs": [{"name": r.name, "values": r.values} for r in self.runs],
            "seeds": self.seeds,
            "engine": self.engine,
            "out": self.out,
            "jobs": self.jobs,
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
    jobs = check_jobs(data.get("jobs", 1), engine)
    seed_list = list(seeds) if seeds is not None else None
    return SweepSpec(base, grid, runs, seed_list, engine, out, jobs)


def check_jobs(jobs: Any, engine: str) -> int:
    """``jobs`` (runs at once) if it is an integer >= 1 that ``engine`` can do, else ConfigError."""
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"sweep jobs: must be an integer >= 1 (runs at once), got {jobs!r}")
    if jobs > 1 and engine != "inprocess":
        raise ConfigError(
            f"sweep: --jobs {jobs} needs the inprocess engine: each simulation run starts its own Ray "
            "cluster sized to every core of the machine, so runs at once would fight for them; "
            "use --jobs 1 or --engine inprocess"
        )
    return jobs


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
    jobs: int | str | None = None,
) -> SweepSpec:
    """The spec file (if any) with the command line on top: ``base`` values win over the file's,
    each ``--grid`` replaces that key's values, ``seeds`` / ``engine`` / ``out`` / ``jobs`` replace
    theirs (``jobs``: an int, or the text of ``--jobs``)."""
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
    if jobs is not None:
        data["jobs"] = parse_jobs(jobs)
    return spec_from_mapping(data)


def parse_jobs(value: int | str) -> int:
    """``--jobs N``: a whole number >= 1, else one :class:`ConfigError` naming ``--jobs``."""
    try:
        jobs = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value).strip())
    except ValueError:
        jobs = None
    if jobs is None or jobs < 1:
        raise ConfigError(f"--jobs: must be a whole number >= 1 (runs at once), got {str(value)!r}")
    return jobs


def out_dir_of(spec: SweepSpec) -> Path:
    if not spec.out:
        raise ConfigError("sweep: no output directory; set 'out' in the spec or pass --out DIR")
    return Path(spec.out).expanduser().resolve()
