"""Methods are found by name, and their ``method.options`` are typed by the client's and the
strategy's ``Options`` dataclasses."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from clients.base import PartialClient
from fedvit.config import ConfigError, load_config
from fedvit.registry import (
    clients,
    declared,
    get_client,
    method_options,
    option_schema,
    register_client,
    register_strategy,
    strategies,
)
from strategies.base import PersonalizedStrategy


@register_client("test-options-client")
class _OptionsClient(PartialClient):
    @dataclass
    class Options:
        head_epochs: int = 1
        finetune: bool = False


@register_strategy("test-options-strategy")
class _OptionsStrategy(PersonalizedStrategy):
    @dataclass
    class Options:
        server_lr: float = 1.0


def _cfg(options: str):
    return load_config(
        {"overrides": f"method.client=test-options-client method.strategy=test-options-strategy {options}"}
    )


def test_the_foundation_classes_are_registered() -> None:
    assert strategies()["personalized"] is PersonalizedStrategy
    assert clients()["partial"] is PartialClient


def test_options_are_split_between_client_and_strategy_and_typed() -> None:
    cfg = _cfg("method.options.head_epochs=3 method.options.server_lr=0.5")
    client_opts, strategy_opts = method_options(cfg)
    assert client_opts == _OptionsClient.Options(head_epochs=3, finetune=False)
    assert strategy_opts == _OptionsStrategy.Options(server_lr=0.5)


def test_classes_without_options_get_none() -> None:
    assert method_options(load_config({})) == (None, None)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ("method.options.head_epoch=3", "method.options.head_epoch"),  # typo
        ("method.options.head_epochs=many", "method.options.head_epochs"),  # wrong type
    ],
)
def test_bad_options_fail_at_config_time_naming_the_key(options: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        _cfg(options)


def test_options_for_a_method_without_options_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"method\.options\.lr"):
        load_config({"overrides": "method.options.lr=1"})


def test_declared_names_are_exactly_the_registered_classes() -> None:
    """The index read from source (nothing imported) agrees with what importing registers."""
    for kind, table in (("strategy", strategies()), ("client", clients())):
        index = declared(kind)
        assert set(index) == set(table) - {f"test-options-{kind}"}
        for name, where in index.items():
            assert (where.module, where.qualname) == (table[name].__module__, table[name].__qualname__)


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(KeyError, match=r"unknown client 'nope'; registered: \[.*'partial'"):
        get_client("nope")
    with pytest.raises(ConfigError, match=r"method\.strategy.*must be one of \[.*'personalized'"):
        load_config({"overrides": "method.strategy=nope"})


def _in_fresh_interpreter(script: str) -> str:
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_lookup_imports_only_the_module_that_declares_the_name() -> None:
    """A client worker imports its method's client module, the ServerApp its strategy module."""
    script = """
import sys
from fedvit.registry import get_client, get_strategy
def plugins():
    return sorted(m for m in sys.modules if m.startswith(("strategies.", "clients.")))
get_client("fedrep")
client_side = plugins()
get_strategy("fedtp")
print(client_side, sorted(set(plugins()) - set(client_side)))
"""
    client_side, server_side = _in_fresh_interpreter(script).split("] [")
    assert client_side == "['clients.base', 'clients.fedrep'"  # fedrep's client and its base
    assert "clients." not in server_side and "strategies.fedtp" in server_side
    assert "strategies.ffgg" not in server_side


def test_options_read_from_source_are_the_real_options() -> None:
    """Every declared class's Options, read without importing its module (no fallback), has the
    real class's fields, types and defaults; its checks raise the real ConfigError."""
    script = """
import dataclasses, importlib, json, sys, typing
from fedvit.errors import ConfigError
from fedvit.lightload import load_class
from fedvit.registry import declared

def describe(cls):
    if cls is None:
        return None
    hints = typing.get_type_hints(cls)
    return [(f.name, str(hints[f.name]).replace("fedvit._light.", ""), repr(f.default),
             repr(f.default_factory()) if f.default_factory is not dataclasses.MISSING else None)
            for f in dataclasses.fields(cls)]

where = {f"{kind} {name}": d for kind in ("strategy", "client") for name, d in declared(kind).items()}
light = {key: load_class(d.module, d.qualname + ".Options") for key, d in where.items()}
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "flwr", "timm"))
fedtp = light["strategy fedtp"]
try:
    fedtp(head="nope")
    raised = None
except ConfigError as err:
    raised = str(err)
seen_light = {key: describe(cls) for key, cls in light.items()}
real = {}
for key, d in where.items():
    cls = getattr(importlib.import_module(d.module), d.qualname)
    real[key] = describe(getattr(cls, "Options", None))
print(json.dumps({"light": seen_light, "real": real, "heavy": heavy, "raised": raised}))
"""
    import json

    result = json.loads(_in_fresh_interpreter(script))
    assert result["heavy"] == []
    assert result["light"] == result["real"]
    assert sum(v is not None for v in result["real"].values()) >= 10  # most methods have options
    assert result["raised"] == "key 'method.options.head': must be one of ('full', 'basis'), got 'nope'"


def test_options_fall_back_to_importing_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """If a class's Options cannot be read from source, the module is imported: same answer."""
    import fedvit.lightload
    import fedvit.registry

    def unreadable(module: str, qualname: str) -> None:
        raise fedvit.lightload.LightLoadError("not readable")

    monkeypatch.setattr(fedvit.lightload, "load_class", unreadable)
    monkeypatch.setattr(fedvit.registry, "_REGISTERED", {"strategy": {}, "client": {}})  # none imported
    from clients.fedrep import FedRepClient

    assert option_schema("client", "fedrep") is FedRepClient.Options


# --------------------------------------------------------------------------- a method's own subcommands


def test_method_commands_are_declared_in_source_and_registered_by_their_module() -> None:
    """``@register_command`` is read from source with its help line; importing the module
    registers the same function under the same name."""
    import importlib

    from fedvit.registry import _REGISTERED

    index = declared("command")
    assert {"alpha", "bench pfedla-memory"} <= set(index)
    assert index["alpha"].help.startswith("heatmaps of a pFedLA run")
    for name, where in index.items():
        module = importlib.import_module(where.module)
        assert _REGISTERED["command"][name] is getattr(module, where.qualname)


def test_the_cli_lists_method_commands_without_importing_them_and_runs_one_by_importing_it(tmp_path) -> None:
    """``fedvit --help`` names ``alpha`` and ``bench pfedla-memory`` with no method module (nor
    torch) imported; ``fedvit alpha`` imports pFedLA's α module (and no other method module)."""
    script = f"""
import contextlib, io, sys
from fedvit.cli import build_parser, main
def loaded():
    return sorted(m for m in sys.modules if m.startswith(("strategies", "clients", "torch")))
parser = build_parser()
sub = next(a for a in parser._actions if a.dest == "command")
text, bench = parser.format_help(), sub.choices["bench"].format_help()
print("alpha" in text, "pfedla-memory" in bench, loaded())
with contextlib.redirect_stderr(io.StringIO()):
    rc = main(["alpha", {str(tmp_path)!r}])
print(rc, [m for m in loaded() if m.startswith(("strategies", "clients"))])
"""
    first, second = _in_fresh_interpreter(script).splitlines()
    assert first == "True True []"
    assert second == "2 ['strategies', 'strategies.pfedla_alpha']"  # no alpha.npz there: exit code 2
