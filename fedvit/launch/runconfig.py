"""Run-config text: Flower's ``key=value`` syntax read and written, local paths made absolute.

A copy of Flower's ``--run-config`` tokenizer that is stricter (text that is not a pair is an
error, not dropped) and friendlier (a bare word is a string); :func:`format_run_config` writes what
Flower's own parser reads back unchanged.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedvit.errors import ConfigError

#: Run-config keys that hold local paths (made absolute against the caller's cwd).
PATH_KEYS = ("data-dir", "output-dir", "resume")
#: Dotted config keys that hold local paths, when they appear in the ``overrides`` dotlist.
#: (``data.path`` is not here: a relative one is relative to ``data.data_dir``.)
PATH_DOTKEYS = (
    "data.data_dir",
    "data.cache_dir",
    "output.dir",
    "server.resume",
    "clients.state_dir",
    "model.pretrained",
)

# Flower's own `--run-config` tokenizer (flwr.common.config.parse_config_args).
_PAIR = re.compile(r"""\s*(\S+?)=('[^']*'|"[^"]*"|\S+)""")


def parse_kv_string(text: str, what: str = "run-config") -> dict[str, Any]:
    """Parse ``'k1=v1 k2="a b" k3=2'`` the way Flower does (values are TOML).

    Friendlier than Flower in two ways: a bare word that is not TOML is a string
    (``method=fedper``), and text that is not a ``key=value`` pair is an error instead of
    being dropped silently.
    """
    out: dict[str, Any] = {}
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _PAIR.match(text, pos)
        if m is None or (m.end() < len(text) and not text[m.end()].isspace()):
            rest = text[pos:].strip().split()[0]
            raise ConfigError(f"{what}: cannot parse '{rest}' (expected key=value pairs, e.g. \"a=1 b='x'\")")
        key, raw = m.group(1), m.group(2)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            if raw[0] in "'\"":
                raise ConfigError(f"{what}: invalid value for '{key}': {raw}") from None
            value = raw
        if isinstance(value, dict | list):
            raise ConfigError(f"{what}: '{key}' must be a bool, int, float or string, got {raw}")
        out[key] = value
        pos = m.end()
    return out


def load_kv_args(args: list[str] | None, what: str = "run-config") -> dict[str, Any]:
    """Merge repeated ``--run-config`` arguments: each ``k=v ...`` text or a ``.toml`` file."""
    out: dict[str, Any] = {}
    for arg in args or []:
        if arg.strip().endswith(".toml") and "=" not in arg:
            path = Path(arg.strip()).expanduser()
            try:
                data = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as err:
                raise ConfigError(f"{what}: cannot read {path}: {err}") from err
            out.update(_flatten(data))
        else:
            out.update(parse_kv_string(arg, what))
    return out


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def toml_value(value: Any, key: str = "value") -> str:
    """One value in the TOML syntax Flower's ``--run-config`` tokenizer accepts.

    Strings go in single quotes (TOML literal strings: backslashes stay as they are), or in
    double quotes with TOML escapes when they hold a single quote. A string with both quote
    characters or a newline cannot pass Flower's tokenizer: :class:`ConfigError`.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        if "\n" in value or "\r" in value:
            raise ConfigError(f"run-config '{key}': a value cannot hold a line break")
        if "'" not in value:
            return f"'{value}'"
        if '"' not in value:
            return '"' + value.replace("\\", "\\\\") + '"'
        raise ConfigError(f"run-config '{key}': a value cannot hold both ' and \" ({value!r})")
    raise ConfigError(f"run-config '{key}': must be a bool, int, float or string, got {type(value).__name__}")


def format_kv(config: Mapping[str, Any], what: str = "run-config") -> str:
    """``{'a': 1, 'b': 'x y'}`` -> ``"a=1 b='x y'"``, safe for Flower's parser."""
    parts = []
    for key, value in config.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise ConfigError(f"{what}: invalid key {key!r}")
        parts.append(f"{key}={toml_value(value, key)}")
    return " ".join(parts)


def format_run_config(run_config: Mapping[str, Any]) -> str:
    """A run config as one ``--run-config`` argument (``None`` values are left out)."""
    return format_kv({k: v for k, v in run_config.items() if v is not None})


def absolutize_paths(run_config: Mapping[str, Any], cwd: str | Path | None = None) -> dict[str, Any]:
    """Copy of ``run_config`` with relative local paths made absolute against ``cwd``.

    Covers :data:`PATH_KEYS` and, inside ``overrides``, the :data:`PATH_DOTKEYS` items.
    ``""`` (= not set) stays ``""``; ``~`` is expanded.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()

    def fix(path: str) -> str:
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    out = dict(run_config)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value:
            out[key] = fix(value)
    overrides = out.get("overrides")
    if isinstance(overrides, str) and overrides:
        items = []
        for item in overrides.split():
            key, sep, value = item.partition("=")
            if (
                sep
                and key.lstrip("+~") in PATH_DOTKEYS
                and value
                and value[0] not in "'\""
                and value != "null"
                and not value.startswith("timm:")  # model.pretrained='timm:<name>' names no file
            ):
                item = f"{key}={fix(value)}"
            items.append(item)
        out["overrides"] = " ".join(items)
    return out
