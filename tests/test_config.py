"""The layered configuration: composition order, Flower run-config keys, and one clear
error per bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedvit.config import (
    RUN_CONFIG_KEYS,
    AnytimeConfig,
    ConfigError,
    DataConfig,
    FedvitConfig,
    ModelConfig,
    PartitionConfig,
    ServerConfig,
    TrainConfig,
    flwr_app_config_toml,
    load_config,
)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_defaults_are_fedper_on_digits_with_a_tiny_vit() -> None:
    cfg = load_config({})
    assert (cfg.method.name, cfg.data.name, cfg.model.name) == ("fedper", "digits", "vit-tiny")
    assert cfg.method.private == ["head"]
    assert cfg.data.source == "sklearn-digits"


def test_pyproject_run_config_defaults_all_mean_unset_and_resolve() -> None:
    import tomllib

    defaults = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert set(defaults) == {*RUN_CONFIG_KEYS, "overrides"}
    assert all(v == "" for v in defaults.values())
    assert load_config(defaults) == load_config({})


def test_pyproject_run_config_section_is_generated_from_run_config_keys() -> None:
    """RUN_CONFIG_KEYS is the one list: pyproject.toml's section is exactly what it generates."""
    lines = PYPROJECT.read_text().splitlines()
    start = lines.index("[tool.flwr.app.config]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    section = "\n".join(line for line in lines[start:end] if line.strip()) + "\n"
    expected = flwr_app_config_toml()
    assert section == expected, f"pyproject.toml's run-config section should read:\n{expected}"


def test_method_layer_sets_private_groups() -> None:
    assert load_config({"method": "fedavg"}).method.private == []
    assert load_config({"method": "local"}).method.private == ["all"]


def test_run_config_keys_override_yaml_layers() -> None:
    cfg = load_config(
        {
            "num-server-rounds": 7,
            "num-clients": 4,
            "alpha": 0.1,
            "partition": "iid",
            "local-epochs": 2,
            "fraction-train": 0.5,
            "seed": 3,
        }
    )
    assert cfg.server.num_rounds == 7 and cfg.clients.num_clients == 4
    assert cfg.data.partition.alpha == 0.1 and cfg.data.partition.kind == "iid"
    assert cfg.train.local_epochs == 2 and cfg.server.fraction_train == 0.5 and cfg.seed == 3


def test_empty_string_means_not_set() -> None:
    assert load_config({"num-server-rounds": ""}).server.num_rounds == load_config({}).server.num_rounds


def test_overrides_reach_any_nested_key() -> None:
    cfg = load_config({"overrides": "train.lr=0.2 model.depth=2 data.partition.min_size=3"})
    assert cfg.train.lr == 0.2 and cfg.model.depth == 2 and cfg.data.partition.min_size == 3


def test_experiment_layer_sits_between_yaml_and_run_config(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    import shutil

    shutil.copytree(Path(__file__).resolve().parents[1] / "conf", conf)
    (conf / "experiment" / "exp.yaml").write_text(
        "method: {name: fedavg}\nserver: {num_rounds: 42}\ntrain: {lr: 0.01}\n"
    )
    cfg = load_config({"experiment": "exp"}, conf_dir=conf)
    assert cfg.method.name == "fedavg" and cfg.method.private == [] and cfg.server.num_rounds == 42
    cfg = load_config({"experiment": "exp", "method": "fedper", "num-server-rounds": 2}, conf_dir=conf)
    assert cfg.method.name == "fedper" and cfg.method.private == ["head"] and cfg.server.num_rounds == 2


@pytest.mark.parametrize(
    ("run_config", "names"),
    [
        ({"num-rounds": 3}, "num-rounds"),  # not a run-config key
        ({"overrides": "train.lrr=0.1"}, "train.lrr"),  # unknown nested key
        ({"overrides": "train.lr=fast"}, "train.lr"),  # wrong type
        ({"num-server-rounds": "many"}, "server.num_rounds"),
        ({"num-server-rounds": 0}, "server.num_rounds"),
        ({"fraction-train": 1.5}, "server.fraction_train"),
        ({"alpha": -1.0}, "data.partition.alpha"),
        ({"partition": "random"}, "data.partition.kind"),
        ({"method": "fedmagic"}, "fedmagic"),
        ({"dataset": "imagenet-42"}, "imagenet-42"),
        ({"experiment": "nope"}, "nope"),
        ({"overrides": "method.private=[tail]"}, "method.private"),
        ({"overrides": "model.num_heads=5"}, "model.num_heads"),
        ({"overrides": "model.patch_size=5"}, "model.patch_size"),
        ({"overrides": "train.optimizer=lbfgs"}, "train.optimizer"),
        ({"overrides": "model.pretrained=/no/such/file.pt"}, "model.pretrained"),
        ({"overrides": "server.min_train_clients=9"}, "server.min_train_clients"),
        ({"partition": "natural"}, "data.partition.kind"),
    ],
)
def test_bad_input_fails_with_one_error_naming_the_key(run_config: dict, names: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(run_config)
    assert names in str(info.value)
    assert "\n" not in str(info.value).strip()


@pytest.mark.parametrize(
    ("section", "check", "key"),
    [
        (TrainConfig(lr=0.0), lambda t: t.validate(), "train.lr"),
        (ServerConfig(min_train_clients=4), lambda s: s.validate(num_clients=3), "server.min_train_clients"),
        (DataConfig(in_chans=3), lambda d: d.validate(), "data.mean"),
        (
            DataConfig(partition=PartitionConfig(classes_per_client=11)),
            lambda d: d.partition.validate(d),
            "data.partition.classes_per_client",
        ),
        (
            ModelConfig(depth=2, anytime=AnytimeConfig(enabled=True, exits=[3])),
            lambda m: m.anytime.validate(m),
            "model.anytime.exits",
        ),
        (ModelConfig(patch_size=5), lambda m: m.validate(DataConfig()), "model.patch_size"),
    ],
)
def test_each_section_validates_itself_naming_the_key(section: object, check, key: str) -> None:
    """A section checks its own values, given only the sections it depends on (built directly,
    sections are not checked: tests and code may hold partial ones)."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check(section)


def test_a_whole_config_validates_every_section() -> None:
    cfg = FedvitConfig()
    cfg.validate()
    cfg.train.momentum = 1.0
    with pytest.raises(ConfigError, match=r"train\.momentum"):
        cfg.validate()


def test_load_config_imports_neither_torch_nor_flwr_nor_any_method_module() -> None:
    """Every method of conf/method/ is composed and checked (its typed method.options included)
    without torch, timm, flwr or the method's own modules: ``fedvit config`` stays fast."""
    script = """
import sys
from pathlib import Path
from fedvit.config import CONF_DIR, load_config
methods = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
for method in methods:
    load_config({"method": method})
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "flwr"))
plugins = sorted(m for m in sys.modules if m.startswith(("strategies.", "clients.")))
print(len(methods), heavy[:5], plugins)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    count, heavy, plugins = out.stdout.strip().split(" ", 2)
    assert int(count) >= 20
    assert (heavy, plugins) == ("[]", "[]"), out.stdout
