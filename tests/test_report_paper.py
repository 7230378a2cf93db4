"""`fedvit report --paper` / `--curves`: our runs over seeds beside a published table, ranked,
with Kendall's tau; accuracy vs round of every method from full-evaluation rounds."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
from scipy.stats import kendalltau

import fedvit.config
from fedvit.cli import main
from fedvit.config import CONF_DIR
from fedvit.plots import seed_curve
from fedvit.report import (
    ReportError,
    finished_runs,
    load_paper,
    paper_markdown,
    paper_rows,
    report_methods,
    write_curves,
)

# The paper's OrganAMNIST column (issue 16), by fedvit method.
ORGANAMNIST = {
    "fedavg": 87.31,
    "local": 78.26,
    "apfl": 89.74,
    "perfedavg": 82.81,
    "fedbn": 87.63,
    "fedbabu": 88.38,
    "fedper": 92.63,
    "vanilla-attention": 88.90,
    "fedperfix": 93.17,
}


def fake_run(
    root: Path,
    method: str,
    seed: int,
    curve: list[float],
    *,
    client_std: float = 0.05,
    dataset: str = "organamnist",
    sampled: tuple[int, ...] = (),
    status: str = "completed",
) -> Path:
    """A run directory whose test accuracy (mean over clients) in round i+1 is ``curve[i]``;
    rounds in ``sampled`` were evaluated on a sample of the clients."""
    run_dir = root / f"{method}-s{seed}"
    run_dir.mkdir(parents=True)
    rounds = []
    for i, acc in enumerate(curve, start=1):
        mode = "sampled" if i in sampled else "full"
        stats = {"n": 4 if mode == "full" else 2, "mean": acc, "std": client_std, "weighted_mean": acc}
        rounds.append({"round": i, "eval": {"mode": mode, "per_client": {}, "test_acc": stats}})
    full = [r for r in rounds if r["eval"]["mode"] == "full"]
    last = {"round": full[-1]["round"], "test_acc": full[-1]["eval"]["test_acc"]}
    data = {
        "method": method,
        "dataset": dataset,
        "config": {"seed": seed},
        "status": status,
        "rounds": rounds,
        "summary": {"last_round": last, "best_val_round": last},
    }
    (run_dir / "results.json").write_text(json.dumps(data))
    return run_dir


def runs_with_finals(root: Path, finals: dict[str, list[float]], **kw) -> list[Path]:
    """One run per (method, seed): final accuracy ``finals[method][seed]``."""
    return [
        fake_run(root, m, s, [0.1, acc], **kw) for m, accs in finals.items() for s, acc in enumerate(accs)
    ]


# --------------------------------------------------------------------------- the published table


def test_fedperfix_table2_holds_the_papers_numbers_and_its_method_names() -> None:
    paper = load_paper("fedperfix-table2")
    assert list(paper.columns) == ["cifar100", "organamnist", "office-home"]
    assert {m: v.values["organamnist"][0] for m, v in paper.methods.items()} == ORGANAMNIST
    assert paper.methods["fedper"].paper_name == "FedRep"  # FedRep as the authors ran it
    assert paper.methods["vanilla-attention"].paper_name == "Vanilla Attention"
    assert paper.methods["fedperfix"].values == {
        "cifar100": (48.10, 7.76),
        "organamnist": (93.17, 3.51),
        "office-home": (24.38, 5.47),
    }
    assert paper.methods["local"].values["cifar100"] == (34.74, 9.36)
    assert {"fedrep", "fedsim", "fedalt", "vanilla-prefix"} <= set(paper.not_in_paper)
    assert not set(paper.not_in_paper) & set(paper.methods)


def test_a_paper_resolves_from_the_packaged_conf_dir_and_from_a_path(tmp_path: Path, monkeypatch) -> None:
    installed = tmp_path / "site-packages" / "fedvit" / "conf"  # where a wheel puts conf/ (force-include)
    shutil.copytree(CONF_DIR / "paper", installed / "paper")
    monkeypatch.setattr(fedvit.config, "CONF_DIR", installed)
    assert load_paper("fedperfix-table2").methods["fedper"].values["organamnist"] == (92.63, 3.77)
    (installed / "paper" / "fedperfix-table2.yaml").unlink()
    with pytest.raises(ReportError, match="no published table 'fedperfix-table2'"):
        load_paper("fedperfix-table2")
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        "datasets: {digits: {title: Digits}}\nmethods: {A: {fedvit: fedavg, digits: {mean: 50, std: 1}}}\n"
    )
    assert load_paper(mine).methods["fedavg"].values == {"digits": (50.0, 1.0)}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("datasets: {d: {}}\nmethods: {A: {d: {mean: 1, std: 1}}}\n", "needs 'fedvit'"),
        (
            "datasets: {d: {}}\nmethods: {A: {fedvit: a, e: {mean: 1, std: 1}}}\n",
            r"unknown column\(s\) \['e'\]",
        ),
        ("datasets: {d: {}}\nmethods: {A: {fedvit: a, d: {mean: high, std: 1}}}\n", "must be numbers"),
        ("datasets: {d: {}}\nmethods: {A: {fedvit: a, d: 50}}\n", "expected"),
        ("methods: {A: {fedvit: a}}\n", "'datasets'"),
        (
            "datasets: {d: {}}\nmethods: {A: {fedvit: a, d: {mean: 1, std: 1}}, B: {fedvit: a}}\n",
            "mapped twice",
        ),
    ],
)
def test_a_malformed_paper_yaml_names_the_problem(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ReportError, match=error):
        load_paper(path)


# --------------------------------------------------------------------------- ours beside theirs


def test_ours_is_the_mean_over_seeds_with_its_std_and_the_mean_std_over_clients(tmp_path: Path) -> None:
    fake_run(tmp_path, "fedper", 0, [0.3, 0.80], client_std=0.04)
    fake_run(tmp_path, "fedper", 1, [0.3, 0.86], client_std=0.08)
    fake_run(tmp_path, "fedper", 2, [0.3, 0.83], client_std=0.06)
    groups = finished_runs(sorted(tmp_path.iterdir()))
    (row,), info = paper_rows(groups, load_paper("fedperfix-table2"))
    assert info["column"] == "organamnist"  # from the runs' dataset
    assert row["method"] == "FedRep" and row["fedvit"] == "fedper" and row["seeds"] == 3
    assert row["ours_mean"] == pytest.approx(0.83)
    assert row["ours_std_seeds"] == pytest.approx(statistics.stdev([0.80, 0.86, 0.83]))
    assert row["ours_std_clients"] == pytest.approx(0.06)
    assert (row["paper_mean"], row["paper_std_clients"]) == (92.63, 3.77)
    text = paper_markdown([row], info)
    assert "| FedRep | fedper | 3 | 83.00 ± 3.00 | 6.00 | 92.63 ± 3.77 | -9.63 | 1 | 1 | 1, 1, 1 |" in text


def test_identical_rank_orders_give_tau_one_and_reversed_give_minus_one(tmp_path: Path) -> None:
    paper = load_paper("fedperfix-table2")
    same = runs_with_finals(tmp_path / "same", {m: [v / 100 - 0.1] for m, v in ORGANAMNIST.items()})
    rows, info = paper_rows(finished_runs(same), paper)
    assert info["tau"] == 1.0
    assert [r["rank_ours"] for r in rows] == [r["rank_paper"] for r in rows]
    assert info["order_ours"] == info["order_paper"]
    assert info["order_paper"][:2] == ["FedPerfix (fedperfix)", "FedRep (fedper)"]
    assert info["order_paper"][-1] == "Local (local)"

    reversed_ = runs_with_finals(tmp_path / "rev", {m: [1 - v / 100] for m, v in ORGANAMNIST.items()})
    rows, info = paper_rows(finished_runs(reversed_), paper)
    assert info["tau"] == -1.0
    assert info["order_ours"] == info["order_paper"][::-1]
    assert {r["fedvit"]: r["rank_ours"] for r in rows}["local"] == 1


def test_tau_is_scipys_over_the_methods_with_a_paper_value(tmp_path: Path) -> None:
    finals = {
        "fedavg": [0.70, 0.74],
        "local": [0.81, 0.79],
        "fedper": [0.90, 0.88],
        "fedperfix": [0.86, 0.90],
        "fedbn": [0.72, 0.71],
        "fedrep": [0.99, 0.99],  # no paper value: must not move tau
        "fedsim": [0.01, 0.02],
    }
    rows, info = paper_rows(finished_runs(runs_with_finals(tmp_path, finals)), load_paper("fedperfix-table2"))
    compared = ["fedavg", "local", "fedbn", "fedper", "fedperfix"]  # the paper's order
    ours = [statistics.fmean(finals[m]) for m in compared]
    expected = kendalltau(ours, [ORGANAMNIST[m] for m in compared])
    assert info["compared"] == 5
    assert info["tau"] == pytest.approx(expected.statistic)
    assert info["p_value"] == pytest.approx(expected.pvalue)
    # the paper's methods first in its order, then the ones it does not have
    assert [r["fedvit"] for r in rows] == [*compared, "fedrep", "fedsim"]
    by = {r["fedvit"]: r for r in rows}
    assert by["fedrep"]["paper_mean"] is None and by["fedrep"]["rank_ours"] is None
    assert by["fedrep"]["ours_mean"] == pytest.approx(0.99)  # still in the table
    assert [by[m]["rank_ours"] for m in compared] == [4, 3, 5, 1, 2]  # means .72 .80 .715 .89 .88
    text = paper_markdown(rows, info)
    assert f"over the 5 methods with a paper value: {expected.statistic:.3f}" in text
    assert "| – | fedrep | 2 | 99.00 ± 0.00 | 5.00 | – | – | – | – | – |" in text
    assert "Without a paper value (in the table, left out of the ranks and τ):" in text
    assert "- fedrep: the alternating FedRep" in text
    assert "In the paper, not among these runs: APFL, Per-FedAvg, FedBABU, Vanilla Attention" in text


def test_each_seed_every_compared_method_has_gets_its_own_ranks_and_tau(tmp_path: Path) -> None:
    """Whether a rank difference from the paper is already inside our own seed-to-seed spread."""
    finals = {
        "fedavg": [0.70, 0.74, 0.72],
        "local": [0.81, 0.79],  # no seed 2: seed 2 is not common to every compared method
        "fedper": [0.90, 0.75, 0.88],
        "fedperfix": [0.86, 0.90, 0.91],
        "fedrep": [0.10, 0.99, 0.50],  # no paper value: ranked nowhere
    }
    rows, info = paper_rows(finished_runs(runs_with_finals(tmp_path, finals)), load_paper("fedperfix-table2"))
    assert info["seeds_common"] == [0, 1]
    by = {r["fedvit"]: r for r in rows}
    # seed 0: fedper .90 > fedperfix .86 > local .81 > fedavg .70; seed 1: .90 > .79 > .75 > .74
    assert {m: by[m]["rank_per_seed"] for m in ("fedavg", "local", "fedper", "fedperfix")} == {
        "fedavg": [4, 4],
        "local": [3, 2],
        "fedper": [1, 3],
        "fedperfix": [2, 1],
    }
    assert by["fedrep"]["rank_per_seed"] == []
    compared = ["fedavg", "local", "fedper", "fedperfix"]
    for seed in (0, 1):
        expected = kendalltau([finals[m][seed] for m in compared], [ORGANAMNIST[m] for m in compared])
        assert info["tau_per_seed"][seed] == pytest.approx(expected.statistic)
    text = paper_markdown(rows, info)
    assert "| 4 | 3 | 4, 4 |" in text  # FedAvg: rank of its mean over seeds, the paper's, each seed's
    assert f"τ-b seed 0: {info['tau_per_seed'][0]:.3f}, seed 1: {info['tau_per_seed'][1]:.3f}" in text


def test_paper_dataset_picks_a_column_and_unknown_columns_are_refused(tmp_path: Path) -> None:
    groups = finished_runs(runs_with_finals(tmp_path, {"fedavg": [0.2], "fedper": [0.4]}, dataset="digits"))
    paper = load_paper("fedperfix-table2")
    with pytest.raises(ReportError, match="'digits', which no column of fedperfix-table2 holds"):
        paper_rows(groups, paper)
    rows, info = paper_rows(groups, paper, "cifar100")
    assert info["column_title"] == "CIFAR-100"
    assert [r["paper_mean"] for r in rows] == [23.29, 44.42]
    assert info["tau"] == 1.0
    with pytest.raises(ReportError, match="no column 'svhn'; columns: cifar100, organamnist, office-home"):
        paper_rows(groups, paper, "svhn")


def test_runs_that_cannot_be_reported_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=r"empty: no results\.json"):
        finished_runs([tmp_path / "empty"])
    running = fake_run(tmp_path, "fedavg", 0, [0.5], status="running")
    with pytest.raises(ReportError, match="has not completed"):
        finished_runs([running])
    a = fake_run(tmp_path / "a", "fedper", 0, [0.5])
    b = fake_run(tmp_path / "b", "fedper", 0, [0.6])
    with pytest.raises(ReportError, match="two runs of fedper on organamnist with seed 0"):
        finished_runs([a, b])
    other = fake_run(tmp_path, "fedbn", 0, [0.5], dataset="cifar100")
    with pytest.raises(ReportError, match="several datasets"):
        paper_rows(finished_runs([a, other]), load_paper("fedperfix-table2"))


def test_a_sweep_directory_stands_for_its_completed_runs(tmp_path: Path) -> None:
    fake_run(tmp_path, "fedavg", 0, [0.5, 0.6])
    fake_run(tmp_path, "fedper", 0, [0.5, 0.9])
    fake_run(tmp_path, "fedbn", 0, [0.5], status="running")
    names = ["fedavg-s0", "fedper-s0", "fedbn-s0", "local-s0"]
    (tmp_path / "sweep.json").write_text(json.dumps({"runs": [{"name": n} for n in names]}))
    rows, text = report_methods([tmp_path], paper="fedperfix-table2")
    assert [r["fedvit"] for r in rows] == ["fedavg", "fedper"]
    assert "2 of 4 runs not completed, left out" in text


def test_a_sweep_of_one_method_in_several_configurations_is_grouped_by_its_run_labels(tmp_path: Path) -> None:
    fake_run(tmp_path / "full", "fedavg", 0, [0.5, 0.6])
    fake_run(tmp_path / "probe", "fedavg", 0, [0.3, 0.4])
    runs = [
        {"name": "full/fedavg-s0", "label": "fedavg-finetune"},
        {"name": "probe/fedavg-s0", "label": "last-head"},
    ]
    (tmp_path / "sweep.json").write_text(json.dumps({"runs": runs}))
    rows, _ = report_methods([tmp_path], curves=tmp_path / "curves.png")
    assert [(r["method"], r["last_mean"]) for r in rows] == [("fedavg-finetune", 0.6), ("last-head", 0.4)]
    assert (tmp_path / "curves.png").stat().st_size > 0
    with pytest.raises(ReportError, match="two runs of fedavg"):  # the same runs without their sweep
        report_methods([tmp_path / "full" / "fedavg-s0", tmp_path / "probe" / "fedavg-s0"])


def table_and_authors(tmp_path: Path) -> list[Path]:
    """Two sweeps: ``table`` (FedAvg 60%, FedPer 80%) and ``authors``, another configuration of
    FedAvg labelled ``fedavg-authors`` (90%); seed 0 each."""
    fake_run(tmp_path / "table", "fedavg", 0, [0.5, 0.6])
    fake_run(tmp_path / "table", "fedper", 0, [0.5, 0.8])
    fake_run(tmp_path / "authors", "fedavg", 0, [0.5, 0.9])
    for sweep, names in (("table", ["fedavg", "fedper"]), ("authors", ["fedavg-authors"])):
        runs = [{"name": f"{n.split('-')[0]}-s0", "label": n} for n in names]
        (tmp_path / sweep / "sweep.json").write_text(json.dumps({"runs": runs}))
    return [tmp_path / "table", tmp_path / "authors"]


def test_another_configuration_of_a_paper_method_is_a_row_outside_the_ranks(tmp_path: Path) -> None:
    sweeps = table_and_authors(tmp_path)
    rows, text = report_methods(sweeps, paper="fedperfix-table2")
    assert [(r["fedvit"], r["rank_ours"]) for r in rows] == [
        ("fedavg", 2),
        ("fedper", 1),
        ("fedavg-authors", None),
    ]
    assert (
        "fedavg-authors: another configuration of fedavg, the paper's FedAvg (run label fedavg-authors)"
        in text
    )


def test_a_paper_row_can_compare_another_configuration_and_the_usual_runs_keep_a_row(tmp_path: Path) -> None:
    sweeps = table_and_authors(tmp_path)
    rows, text = report_methods(
        sweeps, paper="fedperfix-table2", paper_rows_from={"FedAvg": "fedavg-authors"}
    )
    assert [(r["method"], r["fedvit"], r["rank_ours"]) for r in rows] == [
        ("FedAvg", "fedavg-authors", 1),  # 90% against FedRep's 80%
        ("FedRep", "fedper", 2),
        ("", "fedavg", None),
    ]
    assert "- fedavg: the paper's FedAvg row compares fedavg-authors here (--paper-row)" in text
    with pytest.raises(ReportError, match="FedAvgX not in fedperfix-table2"):
        report_methods(sweeps, paper="fedperfix-table2", paper_rows_from={"FedAvgX": "fedavg-authors"})
    with pytest.raises(ReportError, match="no completed runs of fedavg-tuned"):
        report_methods(sweeps, paper="fedperfix-table2", paper_rows_from={"FedAvg": "fedavg-tuned"})
    with pytest.raises(ReportError, match="two of the paper's rows would take the same runs"):
        report_methods(sweeps, paper="fedperfix-table2", paper_rows_from={"FedAvg": "fedper"})


# --------------------------------------------------------------------------- the command


def test_cli_prints_the_side_by_side_table(tmp_path: Path, capsys) -> None:
    dirs = runs_with_finals(tmp_path, {"fedavg": [0.80, 0.82], "fedperfix": [0.90, 0.92], "fedsim": [0.5]})
    csv_path = tmp_path / "t.csv"
    assert main(["report", "--paper", "fedperfix-table2", "--csv", str(csv_path), *map(str, dirs)]) == 0
    out = capsys.readouterr().out
    assert "| FedPerfix | fedperfix | 2 | 91.00 ± 1.41 | 5.00 | 93.17 ± 3.51 | -2.17 | 1 | 1 |" in out
    assert "Rank order, ours:  FedPerfix (fedperfix) > FedAvg (fedavg)" in out
    assert "Kendall's τ-b (scipy.stats.kendalltau) over the 2 methods with a paper value: 1.000" in out
    assert "- fedsim:" in out
    assert csv_path.read_text().splitlines()[0].startswith("method,fedvit,dataset,seeds,ours_mean")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--paper", "fedperfix-table3"], "no published table 'fedperfix-table3'; known: fedperfix-table2"),
        (["--paper", "fedperfix-table2", "--paper-dataset", "svhn"], "has no column 'svhn'"),
        (["--paper-dataset", "organamnist"], "--paper-dataset needs --paper"),
        (["--paper", "fedperfix-table2", "--select", "best-val"], "report the last round"),
        (["--paper", "fedperfix-table2", "--paper-row", "FedBABU"], "give NAME=LABEL"),
        (["--paper-row", "FedBABU=fedbabu-authors"], "--paper-row needs --paper"),
    ],
)
def test_cli_bad_paper_arguments_exit_2_with_one_line(tmp_path: Path, capsys, args, error) -> None:
    run = fake_run(tmp_path, "fedavg", 0, [0.5])
    assert main(["report", *args, str(run)]) == 2
    err = capsys.readouterr().err
    assert error in err and err.count("\n") == 1


def test_cli_a_run_dir_without_results_exits_2(tmp_path: Path, capsys) -> None:
    run = fake_run(tmp_path, "fedavg", 0, [0.5])
    (tmp_path / "nothing").mkdir()
    assert main(["report", "--paper", "fedperfix-table2", str(run), str(tmp_path / "nothing")]) == 2
    assert "nothing: no results.json" in capsys.readouterr().err


# --------------------------------------------------------------------------- accuracy vs round


def test_curve_uses_full_rounds_only_with_mean_and_min_max_over_seeds(tmp_path: Path) -> None:
    a = json.loads(fake_run(tmp_path, "fedper", 0, [0.2, 0.4, 0.9, 0.6]).joinpath("results.json").read_text())
    b = fake_run(tmp_path, "fedper", 1, [0.4, 0.6, 0.1, 0.8], sampled=(3,))
    b = json.loads((b / "results.json").read_text())
    curve = seed_curve([a, b])
    assert curve["rounds"] == [1, 2, 4]  # round 3 was sampled in seed 1: left out for both
    assert curve["sampled_rounds"] == [3]
    assert curve["mean"] == pytest.approx([0.3, 0.5, 0.7])
    assert curve["lo"] == pytest.approx([0.2, 0.4, 0.6]) and curve["hi"] == pytest.approx([0.4, 0.6, 0.8])
    assert curve["seeds"] == 2


def test_curves_figure_is_written_headless(tmp_path: Path, capsys) -> None:
    runs = [
        fake_run(tmp_path / "runs", m, s, [0.1 * (s + 1), 0.5, 0.6 + i / 10], sampled=(2,))
        for i, m in enumerate(("fedavg", "fedper", "fedrep"))
        for s in range(2)
    ]
    out = tmp_path / "fig" / "curves.png"
    assert write_curves(finished_runs(runs), out) == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out.unlink()
    assert main(["report", "--curves", str(out), *map(str, runs)]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and f"min–max band): {out}" in text
    assert "| fedper | organamnist | 70.00 ± 0.00 |" in text  # the table over seeds without --paper
