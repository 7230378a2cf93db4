"""Methods are found by name, and their ``method.options`` are typed by the client's and the
strategy's ``Options`` dataclasses."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from clients.base import PartialClient
from fedvit.config import ConfigError, load_config
from fedvit.registry import clients, method_options, register_client, register_strategy, strategies
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
