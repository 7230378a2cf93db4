"""`fedvit sweep`: run names from values, spec errors, the resume rules (skip completed, continue
from a checkpoint, start a half-written run over), failed runs, the manifest, and the table of
mean ± std over seeds; real in-process sweeps on digits with vit-micro."""

from __future__ import annotations

import csv
import json
import re
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest
from fedhelpers import tiny_sweep_base

from fedvit import sweep
from fedvit.cli import main
from fedvit.config import ConfigError, load_config, to_dict
from fedvit.report import over_seeds, seeds_markdown
from fedvit.sweep import (
    MAX_NAME,
    config_diff,
    parse_grid_arg,
    plan,
    run_config,
    run_sweep,
    spec_from_args,
    spec_from_mapping,
)

SAFE_NAME = re.compile(r"[A-Za-z0-9._+=,~-]+")


def fake_result(last: float, best: float, spread: float, status: str = "completed") -> dict:
    acc = {"n": 3, "mean": last, "std": spread}
    return {
        "status": status,
        "summary": {
            "last_round": {"round": 2, "test_acc": acc},
            "best_val_round": {"round": 1, "test_acc": {"n": 3, "mean": best, "std": 0.0}},
        },
    }


def write_result(run_dir: Path, data: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(data))


def fake_engine(calls: list[str], acc: dict[str, float] | None = None):
    """A run function that records the call and writes a completed results.json."""

    def run(rc: dict, cfg) -> tuple[bool, str]:
        calls.append(rc["run-name"])
        a = (acc or {}).get(cfg.method.name, 0.5) + cfg.seed / 100
        write_result(Path(rc["output-dir"]) / rc["run-name"], fake_result(a, a + 0.01, 0.1))
        return True, "ok"

    return run


# --------------------------------------------------------------------------- names


def test_run_names_are_stable_distinct_short_and_filesystem_safe() -> None:
    grid = {"method": ["fedavg", "fedper"], "train.lr": [0.001, 0.01]}
    runs = plan(spec_from_mapping({"grid": grid, "seeds": [0, 1]}))
    # Every combination at the first seed before any at the second: a batch cut short has a
    # complete one-seed table.
    assert [r.name for r in runs] == [
        "method=fedavg,lr=0.001,seed=0",
        "method=fedavg,lr=0.01,seed=0",
        "method=fedper,lr=0.001,seed=0",
        "method=fedper,lr=0.01,seed=0",
        "method=fedavg,lr=0.001,seed=1",
        "method=fedavg,lr=0.01,seed=1",
        "method=fedper,lr=0.001,seed=1",
        "method=fedper,lr=0.01,seed=1",
    ]
    assert runs[0].combo == runs[4].combo == "method=fedavg,lr=0.001"
    # Same values -> same name, whatever the order in the spec or the other values of the grid.
    reordered = spec_from_mapping({"grid": {"train.lr": [0.01, 0.001], "method": ["fedper"]}, "seeds": [1]})
    assert [r.name for r in plan(reordered)] == [
        "method=fedper,lr=0.01,seed=1",
        "method=fedper,lr=0.001,seed=1",
    ]

    # Values that do not spell out exactly get a hash of the values: still distinct.
    odd = plan(
        spec_from_mapping(
            {
                "grid": {
                    "method.private": [["attn"], ["attn", "head"], [], "attn"],
                    "data.path": ["a/b", "a_b", "x" * 200],
                    "method.options.lr": [0.1],  # shares its last part with nothing: 'lr'
                },
            }
        )
    )
    names = [r.name for r in odd]
    assert len(set(names)) == len(names) == 12
    assert all(SAFE_NAME.fullmatch(n) and len(n) <= MAX_NAME for n in names), names
    assert "path=a_b,lr=0.1,private=attn" in names  # exact values: no hash; keys sorted by full key
    assert sum("~" in n for n in names) == 12 - 1
    # Two keys with the same last part keep their full names.
    clash = plan(spec_from_mapping({"grid": {"train.lr": [0.1], "method.options.lr": [0.2]}}))
    assert clash[0].name == "method.options.lr=0.2,train.lr=0.1"
    # Explicit runs are named by their name (crossed with the grid and seeds, if any).
    named = spec_from_mapping(
        {
            "runs": [{"name": "attn-only", "values": {"method.private": ["attn"]}}, {"name": "base"}],
            "grid": {"alpha": [0.1]},
            "seeds": [3],
        }
    )
    assert [r.name for r in plan(named)] == ["attn-only,alpha=0.1,seed=3", "base,alpha=0.1,seed=3"]
    assert [r.name for r in plan(spec_from_mapping({"runs": [{"name": "x"}]}))] == ["x"]


# --------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"grdi": {"method": ["fedavg"]}}, "unknown key(s) ['grdi']"),
        ({"grid": {"methd": ["fedavg"]}}, "unknown run-config key 'methd'"),
        ({"grid": {"method": []}}, "'method' needs a non-empty list"),
        ({"grid": {"method": "fedavg"}}, "'method' needs a non-empty list"),
        ({"grid": {"method": ["fedavg", ""]}}, "'method' has an empty value"),
        ({"grid": {"alpha": [0.1, None]}}, "'alpha' has an empty value"),
        ({"grid": {"method": ["fedavg", "fedavg"]}}, "twice"),
        ({"grid": {"train.lr": [{"a": 1}]}}, "'train.lr' must be"),
        ({"grid": {"method": [["fedavg"]]}}, "'method' must be a bool, number or string"),
        ({"grid": {"seed": [0, 1]}}, "use the sweep's seeds"),
        ({"grid": {"overrides": ["a=1"]}}, "cannot be varied"),
        ({"base": {"run-name": "x"}}, "'run-name' cannot be set"),
        ({"base": {"seed": 1}, "seeds": [0]}, "'seed' cannot be set together with seeds"),
        ({"seeds": []}, "non-empty list of integers"),
        ({"seeds": [0, -1]}, "non-empty list of integers"),
        ({"seeds": [0, 0]}, "lists a seed twice"),
        ({"engine": "ray"}, "engine: must be one of"),
        ({"runs": [{"values": {"method": "fedavg"}}]}, "'name' must be"),
        ({"runs": [{"name": "a/b"}]}, "'name' must be"),
        ({"runs": [{"name": "a"}, {"name": "a"}]}, "used twice"),
        ({"runs": [{"name": "a", "vals": {}}]}, "unknown key(s) ['vals']"),
        ({"runs": [{"name": "a", "values": {"method": "x"}}], "grid": {"method": ["y"]}}, "also in the grid"),
    ],
)
def test_a_bad_spec_is_one_config_error(spec: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        spec_from_mapping(spec)
    assert needle in str(err.value)


def test_bad_values_are_refused_before_anything_runs(tmp_path: Path) -> None:
    calls: list[str] = []
    spec = spec_from_mapping(
        {"grid": {"method": ["fedavg", "fedper"], "train.lrr": [0.1]}, "out": str(tmp_path / "s")}
    )
    with pytest.raises(ConfigError, match=r"sweep run 'method=fedavg,lrr=0.1'.*train\.lrr"):
        run_sweep(spec, run_fn=fake_engine(calls), progress=lambda m: None)
    bad_value = spec_from_mapping({"grid": {"alpha": [0.5, -1.0]}, "out": str(tmp_path / "s")})
    with pytest.raises(ConfigError, match=r"alpha=-1.0.*data\.partition\.alpha"):
        run_sweep(bad_value, run_fn=fake_engine(calls), progress=lambda m: None)
    with pytest.raises(ConfigError, match="no output directory"):
        run_sweep(spec_from_mapping({}), run_fn=fake_engine(calls))
    assert calls == [] and not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--grid", "method="], "'method' has an empty value"),
        (["--grid", "method=fedavg,,fedper"], "'method' has an empty value"),
        (["--grid", "method"], "expected key=value1,value2"),
        (["--grid", "bogus=1,2"], "unknown run-config key 'bogus'"),
        (["-c", "alpha=-1"], "data.partition.alpha"),
    ],
)
def test_the_cli_exits_2_with_one_line_on_a_bad_spec(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s"
    assert main(["sweep", "--engine", "inprocess", "--out", str(out), *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("fedvit: error: ") and needle in err[0], err
    assert not out.exists()


def test_grid_arguments_and_the_spec_file_merge(tmp_path: Path) -> None:
    assert parse_grid_arg("method=fedavg,fedper") == ("method", ["fedavg", "fedper"])
    assert parse_grid_arg("train.lr=1e-3,0.01") == ("train.lr", [0.001, 0.01])
    assert parse_grid_arg("method.private=[attn,head],[],[norm]") == (
        "method.private",
        [["attn", "head"], [], ["norm"]],
    )
    assert parse_grid_arg("server.checkpoint=true,false") == ("server.checkpoint", [True, False])
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        "base:\n  num-clients: 4\n  alpha: 0.3\n"
        "grid:\n  method: [fedavg, fedper]\n  train.lr: [1e-3]\n"
        "seeds: [0, 1, 2]\nengine: inprocess\nout: somewhere\n"
    )
    spec = spec_from_args(
        spec_file, base={"alpha": 0.1}, grid=["train.lr=0.01,0.1"], seeds=[5], out=tmp_path / "o"
    )
    assert spec.base == {"num-clients": 4, "alpha": 0.1}
    assert spec.grid == {"method": ["fedavg", "fedper"], "train.lr": [0.01, 0.1]}
    assert (spec.seeds, spec.engine, spec.out) == ([5], "inprocess", str(tmp_path / "o"))
    assert spec_from_args(spec_file).grid["train.lr"] == [0.001]  # YAML's 1e-3 is a float here


def test_run_configs_put_dotted_keys_into_overrides(tmp_path: Path) -> None:
    base = {"num-clients": 2, "method": "fedper", "overrides": "model.depth=1 train.lr=0.5"}
    values = {"method": "fedavg", "train.lr": 0.01, "method.private": ["attn", "head"]}
    rc = run_config(base, values, name="r", out_dir=tmp_path, seed=3)
    assert rc == {
        "num-clients": 2,
        "method": "fedavg",
        "overrides": "model.depth=1 train.lr=0.5 train.lr=0.01 method.private=[attn,head]",
        "seed": 3,
        "run-name": "r",
        "output-dir": str(tmp_path),
    }
    cfg = load_config(rc)
    assert (cfg.method.name, cfg.train.lr, cfg.method.private, cfg.seed) == (
        "fedavg",
        0.01,
        ["attn", "head"],
        3,
    )
    assert (cfg.output.dir, cfg.output.run_name, cfg.model.depth) == (str(tmp_path), "r", 1)
    # A configured state directory is split per run (their private states would collide).
    spec = spec_from_mapping(
        {
            "base": {"overrides": f"clients.state_dir={tmp_path / 'st'}"},
            "grid": {"method": ["fedavg"]},
            "out": str(tmp_path / "s"),
        }
    )
    [(_, cfg)] = sweep.check(spec).values()
    assert cfg.clients.state_dir == str(tmp_path / "st" / "method=fedavg")


# --------------------------------------------------------------------------- the table


def test_the_table_is_mean_and_std_over_seeds() -> None:
    rows = over_seeds([fake_result(0.5, 0.55, 0.1), fake_result(0.6, 0.65, 0.2), fake_result(0.7, 0.6, 0.3)])
    assert rows["seeds_done"] == 3
    assert rows["last_mean"] == pytest.approx(0.6) and rows["last_std"] == pytest.approx(0.1)
    assert rows["best_mean"] == pytest.approx(0.6) and rows["best_std"] == pytest.approx(0.05)
    assert rows["client_std_mean"] == pytest.approx(0.2)
    one = over_seeds([fake_result(0.5, 0.4, 0.1)])
    assert one["last_std"] is None and one["last_mean"] == 0.5
    md = seeds_markdown(
        [{"method": "fedper", **rows, "seeds_total": 4}, {"method": "x", **one}], [("method", "method")]
    )
    lines = md.splitlines()
    assert lines[0].startswith("| method | last round acc. % (mean ± std over seeds) |")
    assert lines[2] == "| fedper | 60.00 ± 10.00 | 60.00 ± 5.00 | 20.00 | 3/4 |"
    assert lines[3] == "| x | 50.00 | 40.00 | 10.00 | 1/1 |"


# --------------------------------------------------------------------------- resume rules, failures


def test_completed_runs_are_skipped_checkpointed_ones_resumed_half_written_ones_restarted(
    tmp_path: Path,
) -> None:
    out = tmp_path / "s"
    spec = spec_from_mapping({"grid": {"method": ["fedavg", "fedper", "local", "fedbn"]}, "out": str(out)})
    write_result(out / "method=fedavg", fake_result(0.9, 0.9, 0.0))  # completed
    write_result(out / "method=fedper", fake_result(0.1, 0.1, 0.0, status="running"))  # killed after round 1
    (out / "method=fedper" / "checkpoint").mkdir()
    (out / "method=fedper" / "checkpoint" / "state.json").write_text(json.dumps({"round": 1}))
    write_result(out / "method=local", fake_result(0.1, 0.1, 0.0, status="running"))  # killed in round 1
    (out / "method=local" / "stray.txt").write_text("left over")
    seen: dict[str, dict] = {}

    def engine(rc: dict, cfg) -> tuple[bool, str]:
        run_dir = Path(rc["output-dir"]) / rc["run-name"]
        seen[rc["run-name"]] = {"resume": rc.get("resume"), "left": sorted(p.name for p in run_dir.glob("*"))}
        write_result(run_dir, fake_result(0.5, 0.5, 0.1))
        return True, "ok"

    messages: list[str] = []
    res = run_sweep(spec, run_fn=engine, progress=messages.append)
    assert res.ok and res.skipped == ["method=fedavg"]
    assert res.ran == ["method=fedper", "method=local", "method=fedbn"]
    assert seen["method=fedper"] == {
        "resume": str(out / "method=fedper"),
        "left": ["checkpoint", "results.json"],
    }
    assert seen["method=local"] == {"resume": None, "left": []}  # cleaned before it started over
    assert seen["method=fedbn"] == {"resume": None, "left": []}
    manifest = {e["name"]: e for e in json.loads((out / "sweep.json").read_text())["runs"]}
    assert {n: (e["status"], e["action"]) for n, e in manifest.items()} == {
        "method=fedavg": ("completed", "skipped"),
        "method=fedper": ("completed", "resumed"),
        "method=local": ("completed", "fresh"),
        "method=fedbn": ("completed", "fresh"),
    }
    assert manifest["method=fedper"]["resumed_after_round"] == 1
    assert any("method=fedper: continuing from its checkpoint after round 1" in m for m in messages)


def test_a_relative_data_dir_in_the_spec_matches_the_absolute_one_a_finished_run_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedvit run` records run-config paths absolute; the spec's relative `data-dir` is the same
    directory, so a finished run is skipped without a "config differs" note, but a really
    different directory is still named."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    run_dir = tmp_path / "run"
    cfg = load_config({"data-dir": "data"})
    recorded = to_dict(load_config({"data-dir": str(tmp_path / "data")}))
    write_result(run_dir, {**fake_result(0.5, 0.5, 0.1), "config": recorded})
    assert config_diff(run_dir, cfg) == []
    other = load_config({"data-dir": str(tmp_path / "elsewhere")})
    assert config_diff(run_dir, other) == ["data.data_dir"]


def test_a_failed_run_is_reported_and_the_rest_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []
    ok = fake_engine(calls, {"fedavg": 0.8})

    def flaky(rc: dict, cfg) -> tuple[bool, str]:
        if cfg.method.name == "fedper":
            calls.append(rc["run-name"])
            return False, "RuntimeError: diverged"
        if cfg.method.name == "local":
            calls.append(rc["run-name"])
            raise OSError("disk full")
        return ok(rc, cfg)

    monkeypatch.setattr(sweep, "run_inprocess", flaky)
    out = tmp_path / "s"
    argv = ["sweep", "--grid", "method=fedper,local,fedavg", "--seeds", "0", "1", "--engine", "inprocess"]
    assert main([*argv, "--out", str(out)]) == 1
    assert calls == [f"method={m},seed={s}" for s in (0, 1) for m in ("fedper", "local", "fedavg")]
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith(
        "fedvit: error: 4 run(s) failed: method=fedper,seed=0, method=local,seed=0, method=fedper,seed=1"
    )
    manifest = {e["name"]: e for e in json.loads((out / "sweep.json").read_text())["runs"]}
    assert manifest["method=fedper,seed=0"]["status"] == "failed"
    assert manifest["method=fedper,seed=0"]["message"] == "RuntimeError: diverged"
    assert manifest["method=local,seed=1"]["message"] == "OSError: disk full"
    assert manifest["method=fedavg,seed=1"]["status"] == "completed"
    table = {r["method"]: r for r in csv.DictReader((out / "sweep.csv").open())}
    assert (table["fedper"]["seeds_done"], table["fedavg"]["seeds_done"]) == ("0", "2")
    assert float(table["fedavg"]["last_mean"]) == pytest.approx(0.805)
    assert "| fedper | – | – | – | 0/2 |" in captured.out
    # The next invocation runs only what has not completed.
    calls.clear()
    monkeypatch.setattr(sweep, "run_inprocess", fake_engine(calls))
    assert main([*argv, "--out", str(out)]) == 0
    assert calls == [f"method={m},seed={s}" for s in (0, 1) for m in ("fedper", "local")]


def test_ctrl_c_marks_the_run_interrupted_and_stops_the_sweep(tmp_path: Path) -> None:
    calls: list[str] = []

    def interrupted(rc: dict, cfg) -> tuple[bool, str]:
        calls.append(rc["run-name"])
        raise KeyboardInterrupt

    out = tmp_path / "s"
    spec = spec_from_mapping({"grid": {"method": ["fedavg", "fedper"]}, "out": str(out)})
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, run_fn=interrupted, progress=lambda m: None)
    assert calls == ["method=fedavg"]
    entries = json.loads((out / "sweep.json").read_text())["runs"]
    assert [e["status"] for e in entries] == ["interrupted", "pending"]


# --------------------------------------------------------------------------- real in-process sweeps


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """FedAvg and FedPer × seeds 0 and 1, run once through `fedvit sweep SPEC.yaml`."""
    root = tmp_path_factory.mktemp("sweep")
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDVIT_STATE_DIR", str(root / "state"))
        spec = {
            "base": tiny_sweep_base(cache),
            "grid": {"method": ["fedavg", "fedper"]},
            "seeds": [0, 1],
            "engine": "inprocess",
            "out": str(root / "out"),
        }
        spec_file = root / "spec.yaml"
        spec_file.write_text(json.dumps(spec))  # JSON is YAML
        assert main(["sweep", str(spec_file)]) == 0
        yield root / "out", spec_file, cache


RUNS = ["method=fedavg,seed=0", "method=fedper,seed=0", "method=fedavg,seed=1", "method=fedper,seed=1"]


def test_a_real_sweep_writes_its_runs_manifest_and_table(
    real_sweep: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _, _ = real_sweep
    assert sorted(p.name for p in out.iterdir()) == sorted([*RUNS, "sweep.json", "sweep.md", "sweep.csv"])
    results = {n: json.loads((out / n / "results.json").read_text()) for n in RUNS}
    assert all(r["status"] == "completed" and len(r["rounds"]) == 2 for r in results.values())
    assert [(r["method"], r["config"]["seed"]) for r in results.values()] == [
        ("fedavg", 0),
        ("fedper", 0),
        ("fedavg", 1),
        ("fedper", 1),
    ]
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["spec"]["grid"] == {"method": ["fedavg", "fedper"]}
    assert [(e["name"], e["values"], e["seed"], e["status"]) for e in manifest["runs"]] == [
        (n, {"method": n.split(",")[0].split("=")[1]}, int(n[-1]), "completed") for n in RUNS
    ]
    assert all(e["wall_s"] > 0 for e in manifest["runs"])
    # The table, by hand from the runs' results.json.
    rows = {r["method"]: r for r in csv.DictReader((out / "sweep.csv").open())}
    assert set(rows) == {"fedavg", "fedper"}
    for method in ("fedavg", "fedper"):
        mine = [results[f"method={method},seed={s}"]["summary"] for s in (0, 1)]
        last = [m["last_round"]["test_acc"]["mean"] for m in mine]
        best = [m["best_val_round"]["test_acc"]["mean"] for m in mine]
        spread = [m["last_round"]["test_acc"]["std"] for m in mine]
        row = rows[method]
        assert float(row["last_mean"]) == pytest.approx(statistics.mean(last))
        assert float(row["last_std"]) == pytest.approx(statistics.stdev(last))
        assert float(row["best_mean"]) == pytest.approx(statistics.mean(best))
        assert float(row["best_std"]) == pytest.approx(statistics.stdev(best))
        assert float(row["client_std_mean"]) == pytest.approx(statistics.mean(spread))
        assert (row["seeds_done"], row["seeds_total"]) == ("2", "2")
        cell = f"{100 * statistics.mean(last):.2f} ± {100 * statistics.stdev(last):.2f}"
        assert f"| {method} | {cell} |" in (out / "sweep.md").read_text()
    # `fedvit report` on the sweep directory prints the same table.
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out in (out / "sweep.md").read_text()


def test_a_second_invocation_skips_completed_runs(
    real_sweep: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, spec_file, _ = real_sweep
    stamps = {n: (out / n / "results.json").stat().st_mtime_ns for n in RUNS}
    walls = [e["wall_s"] for e in json.loads((out / "sweep.json").read_text())["runs"]]
    calls: list[str] = []
    monkeypatch.setattr(sweep, "run_inprocess", fake_engine(calls))
    capsys.readouterr()
    assert main(["sweep", str(spec_file)]) == 0
    assert calls == []
    assert {n: (out / n / "results.json").stat().st_mtime_ns for n in RUNS} == stamps
    assert capsys.readouterr().err.count("completed, skipped") == 4
    entries = json.loads((out / "sweep.json").read_text())["runs"]
    assert [(e["action"], e["wall_s"]) for e in entries] == [("skipped", w) for w in walls]


def test_an_interrupted_run_continues_from_its_checkpoint_to_the_same_results(
    real_sweep: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    reference, _, cache = real_sweep
    name = "method=fedper,seed=0"
    out = tmp_path / "s"

    def spec(rounds: int):
        return spec_from_mapping(
            {
                "base": tiny_sweep_base(cache, rounds),
                "grid": {"method": ["fedper"]},
                "seeds": [0],
                "engine": "inprocess",
                "out": str(out),
            }
        )

    assert run_sweep(spec(1), progress=lambda m: None).ok  # round 1, checkpointed
    path = out / name / "results.json"
    data = json.loads(path.read_text())
    data["status"] = "running"  # as if the sweep had been killed after round 1 of 2
    path.write_text(json.dumps(data))
    messages: list[str] = []
    res = run_sweep(spec(2), progress=messages.append)
    assert res.ok and res.ran == [name]
    assert any("continuing from its checkpoint after round 1" in m for m in messages)
    entry = json.loads((out / "sweep.json").read_text())["runs"][0]
    assert (entry["action"], entry["resumed_after_round"]) == ("resumed", 1)
    resumed = json.loads(path.read_text())
    whole = json.loads((reference / name / "results.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumed_at_round"] == 1
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]
    for got, want in zip(resumed["rounds"], whole["rounds"], strict=True):
        assert got["eval"]["per_client"] == want["eval"]["per_client"]
        assert got["train"]["per_client"] == want["train"]["per_client"]
    assert resumed["summary"] == whole["summary"]
