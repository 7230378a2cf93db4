"""The "where to personalize" study: its 13 configurations, the table from results.json files,
--resume, a real in-process mini study, and the CLI's config errors."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest

from fedvit import sweep
from fedvit.cli import main
from fedvit.config import ConfigError, load_config
from fedvit.study import plan, run_config_for, run_study, study_table, to_markdown

MINI = (
    "model.depth=1 model.embed_dim=16 model.num_heads=2 data.max_train_per_client=60 "
    "train.batch_size=32 output.plots=false"
)


def base_rc(tmp_path: Path, **kw) -> dict:
    rc = {
        "num-server-rounds": 1,
        "num-clients": 2,
        "overrides": f"{MINI} data.cache_dir={tmp_path / 'cache'}",
    }
    rc.update(kw)
    return rc


def fake_result(mean: float, std: float, status: str = "completed") -> dict:
    return {
        "status": status,
        "summary": {"last_round": {"round": 3, "test_acc": {"mean": mean, "std": std, "n": 4}}},
    }


# --------------------------------------------------------------------------- the plan


def test_plan_is_the_13_distinct_configurations() -> None:
    runs = plan()
    by_name = {r.name: list(r.private) for r in runs}
    assert by_name == {
        "wtp-patch_embed-stand-alone": ["patch_embed"],
        "wtp-patch_embed-combined": ["patch_embed", "head"],
        "wtp-pos_embed-stand-alone": ["pos_embed"],
        "wtp-pos_embed-combined": ["pos_embed", "head"],
        "wtp-norm-stand-alone": ["norm"],
        "wtp-norm-combined": ["norm", "head"],
        "wtp-attn-stand-alone": ["attn"],
        "wtp-attn-combined": ["attn", "head"],
        "wtp-mlp-stand-alone": ["mlp"],
        "wtp-mlp-combined": ["mlp", "head"],
        "wtp-head-stand-alone": ["head"],  # head + head = head: run once
        "wtp-all-local": ["all"],
        "wtp-all-global": [],
    }
    assert len(runs) == 13 and len({tuple(sorted(r.private)) for r in runs}) == 13
    assert [r.name for r in runs if r.also_combined] == ["wtp-head-stand-alone"]
    assert [r.name for r in plan(["attn", "all-global"])] == [
        "wtp-attn-stand-alone",
        "wtp-attn-combined",
        "wtp-all-global",
    ]
    with pytest.raises(ConfigError, match="unknown layer type"):
        plan(["blocks"])


def test_run_configs_use_fedavg_with_the_private_groups(tmp_path: Path) -> None:
    base = {"method": "fedper", "num-clients": 2, "overrides": "model.depth=1", "run-name": "x"}
    for r in plan():
        rc = run_config_for(base, r, tmp_path)
        cfg = load_config(rc)
        assert cfg.method.private == list(r.private)
        assert (cfg.method.client, cfg.method.strategy) == ("partial", "personalized")
        assert cfg.output.run_name == r.name and cfg.output.dir == str(tmp_path)
        assert cfg.model.depth == 1 and cfg.clients.num_clients == 2
        assert cfg.clients.state_dir is None
    rc = run_config_for({"overrides": "clients.state_dir=/s"}, plan()[0], tmp_path, "/s")
    assert load_config(rc).clients.state_dir == "/s/wtp-patch_embed-stand-alone"


# --------------------------------------------------------------------------- the table


def test_study_table_numbers_and_formatting() -> None:
    results = {
        "wtp-attn-stand-alone": fake_result(0.80, 0.10),
        "wtp-attn-combined": fake_result(0.90, 0.05),
        "wtp-head-stand-alone": fake_result(0.85, 0.07),
        "wtp-mlp-stand-alone": fake_result(0.70, 0.02),
        "wtp-mlp-combined": fake_result(0.99, 0.01, status="running"),  # unfinished: not counted
        "wtp-all-local": fake_result(0.75, 0.06),
        "wtp-all-global": fake_result(0.60, 0.12),
    }
    rows = {r["layer"]: r for r in study_table(results)}
    assert list(rows) == [
        "patch_embed",
        "pos_embed",
        "norm",
        "attn",
        "mlp",
        "head",
        "all-local",
        "all-global",
    ]
    attn = rows["attn"]
    assert (attn["standalone_mean"], attn["standalone_std"]) == (0.80, 0.10)
    assert (attn["combined_mean"], attn["combined_std"]) == (0.90, 0.05)
    assert attn["overall"] == pytest.approx(0.85)
    head = rows["head"]
    assert head["combined_is_standalone"] and head["combined_mean"] == head["standalone_mean"] == 0.85
    assert head["overall"] == pytest.approx(0.85)
    assert rows["mlp"]["standalone_mean"] == 0.70
    assert rows["mlp"]["combined_mean"] is None and rows["mlp"]["overall"] is None
    assert rows["norm"]["standalone_mean"] is None
    assert rows["all-local"]["standalone_mean"] == 0.75 and rows["all-local"]["overall"] == 0.75
    assert rows["all-global"]["combined_mean"] is None

    md = to_markdown(list(rows.values())).splitlines()
    assert md[0] == "| private layer type | stand-alone % | combined (+ head) % | overall % |"
    assert "| self-attention | 80.00 ± 10.00 | 90.00 ± 5.00 | 85.00 |" in md
    assert "| head | 85.00 ± 7.00 | 85.00 ± 7.00 (= stand-alone) | 85.00 |" in md
    assert "| MLP | 70.00 ± 2.00 | – | – |" in md
    assert "| all-global | 60.00 ± 12.00 |  | 60.00 |" in md
    assert len(md) == 2 + 8


# --------------------------------------------------------------------------- resume


def test_resume_skips_completed_runs_and_refuses_without_it(tmp_path: Path) -> None:
    out = tmp_path / "study"
    done = out / "wtp-attn-stand-alone"
    done.mkdir(parents=True)
    (done / "results.json").write_text(json.dumps(fake_result(0.5, 0.1)))
    calls: list[str] = []

    def fake_run(rc: dict, cfg) -> tuple[bool, str]:
        calls.append(rc["run-name"])
        run_dir = Path(rc["output-dir"]) / rc["run-name"]
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps(fake_result(0.7, 0.2)))
        return True, "ok"

    with pytest.raises(ConfigError, match="--resume"):
        run_study(base_rc(tmp_path), output_dir=out, only=["attn"], run_fn=fake_run, progress=lambda m: None)
    assert calls == []

    res = run_study(
        base_rc(tmp_path),
        output_dir=out,
        only=["attn"],
        resume=True,
        run_fn=fake_run,
        progress=lambda m: None,
    )
    assert calls == ["wtp-attn-combined"]
    assert res.skipped == ["wtp-attn-stand-alone"] and res.ran == ["wtp-attn-combined"] and res.ok
    attn = next(r for r in res.rows if r["layer"] == "attn")
    assert attn["standalone_mean"] == 0.5 and attn["combined_mean"] == 0.7
    assert attn["overall"] == pytest.approx(0.6)

    # Resumed again with every run done: the table files are replaced whole, never written into.
    inodes = {name: (out / name).stat().st_ino for name in ("study.md", "study.csv")}
    rc = base_rc(tmp_path)
    run_study(rc, output_dir=out, only=["attn"], resume=True, run_fn=fake_run, progress=lambda m: None)
    assert calls == ["wtp-attn-combined"]
    umask = os.umask(0)
    os.umask(umask)
    for name, inode in inodes.items():
        assert (out / name).stat().st_ino != inode, name
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name  # default permissions, as before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_run_does_not_stop_the_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def flaky(rc: dict, cfg) -> tuple[bool, str]:
        calls.append(rc["run-name"])
        return rc["run-name"] != "wtp-attn-stand-alone", "boom"

    monkeypatch.setattr(sweep, "run_inprocess", flaky)  # the study runs as a sweep
    rc = base_rc(tmp_path)
    argv = ["study", "where-to-personalize", "--engine", "inprocess", "--only", "attn", "head"]
    assert main([*argv, "--output-dir", str(tmp_path / "s"), "-c", _kv(rc)]) == 1
    assert calls == ["wtp-attn-stand-alone", "wtp-attn-combined", "wtp-head-stand-alone"]
    assert (tmp_path / "s" / "study.md").is_file()


def _kv(rc: dict) -> str:
    from fedvit.runner import format_run_config

    return format_run_config(rc)


# --------------------------------------------------------------------------- a real mini study


def test_inprocess_mini_study_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    argv = [
        "study",
        "where-to-personalize",
        "--engine",
        "inprocess",
        "--only",
        "attn",
        "--output-dir",
        str(out),
    ]
    assert main([*argv, "-c", _kv(base_rc(tmp_path))]) == 0
    printed = capsys.readouterr().out
    assert "| self-attention |" in printed
    for name in ("wtp-attn-stand-alone", "wtp-attn-combined"):
        res = json.loads((out / name / "results.json").read_text())
        assert res["status"] == "completed"
    assert (out / "study.md").read_text().count("| self-attention |") == 1
    rows = {r["layer"]: r for r in csv.DictReader((out / "study.csv").open())}
    attn = rows["attn"]
    for key in ("standalone_mean", "standalone_std", "combined_mean", "combined_std", "overall"):
        assert math.isfinite(float(attn[key])) and 0 <= float(attn[key]) <= 1, (key, attn)
    assert rows["mlp"]["overall"] == ""
    # The study is a sweep of its 13 named runs: the manifest lists all, these two completed.
    manifest = {e["name"]: e for e in json.loads((out / "sweep.json").read_text())["runs"]}
    assert set(manifest) == {r.name for r in plan()}
    assert {n for n, e in manifest.items() if e["status"] == "completed"} == {
        "wtp-attn-stand-alone",
        "wtp-attn-combined",
    }
    assert manifest["wtp-attn-combined"]["run_values"]["method.private"] == ["attn", "head"]
    # A second call with --resume runs nothing.
    assert main([*argv, "--resume", "-c", _kv(base_rc(tmp_path))]) == 0
    assert "completed, skipped" in capsys.readouterr().err


# --------------------------------------------------------------------------- CLI errors


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["-c", "bogus=1"], "unknown run-config key 'bogus'"),
        (["-c", "alpha=-1"], "data.partition.alpha"),
        (["-c", "overrides='model.num_heads=3'"], "model.num_heads"),
        (["--only", "blocks"], "unknown layer type"),
    ],
)
def test_bad_config_exits_2_with_one_line(
    extra: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["study", "where-to-personalize", "--engine", "inprocess", "--output-dir", str(tmp_path)]
    assert main([*argv, *extra]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("fedvit: error: ") and needle in err[0], err
    assert not (tmp_path / "study.md").exists()


def test_resume_continues_an_interrupted_run_from_its_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "study"
    kw = {"output_dir": out, "engine": "inprocess", "only": ["all-global"], "progress": lambda m: None}
    assert run_study(base_rc(tmp_path), **kw).ok
    results = out / "wtp-all-global" / "results.json"
    data = json.loads(results.read_text())
    data["status"] = "running"  # as if the study was killed after round 1 of 2
    results.write_text(json.dumps(data))
    res = run_study(base_rc(tmp_path, **{"num-server-rounds": 2}), resume=True, **kw)
    assert res.ok and res.ran == ["wtp-all-global"]
    data = json.loads(results.read_text())
    assert data["status"] == "completed" and data["resumed_at_round"] == 1
    assert [r["round"] for r in data["rounds"]] == [1, 2]
