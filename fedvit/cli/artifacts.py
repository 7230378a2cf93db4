"""``fedvit report``, ``fedvit pretrain`` and ``fedvit export``: what runs leave behind (tables)
and the models that go in and come out (pretrained weights, an exported personalized model).
pFedLA's α heatmaps (``fedvit alpha``) are pFedLA's own subcommand (``strategies/pfedla_alpha.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedvit.cli.common import EXIT_CONFIG, add_run_config_arg, eprint, run_config


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="one table from finished runs",
        description="Client accuracy (mean ± std over clients, weighted mean, q10-q90) and resources "
        "(storage, computation, communication; absolute and relative to FedAvg on the same dataset) "
        "of each run directory, as Markdown (and CSV with --csv).",
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="outputs/<run-name> directories, or one sweep directory (its table over seeds)",
    )
    p.add_argument(
        "--select",
        choices=("last", "best-val"),
        default="last",
        help="which round: the last, or the one with the best mean validation accuracy",
    )
    p.add_argument("--csv", type=Path, metavar="FILE", help="also write the rows as CSV")
    p.add_argument(
        "--paper",
        metavar="NAME|FILE.yaml",
        help="put a published table beside the runs, grouped by method over seeds (last round): "
        "conf/paper/<NAME>.yaml (e.g. fedperfix-table2) or a YAML path; prints both rank orders and "
        "Kendall's tau",
    )
    p.add_argument(
        "--paper-dataset",
        metavar="COLUMN",
        help="the paper's column to compare with (default: the one holding the runs' dataset)",
    )
    p.add_argument(
        "--paper-row",
        action="append",
        default=[],
        metavar="NAME=LABEL",
        help="compare the paper's method NAME with the runs of another method or run label (e.g. "
        "FedBABU=fedbabu-authors); its usual runs stay in the table without a paper value; repeatable",
    )
    p.add_argument(
        "--curves",
        type=Path,
        metavar="FILE.png",
        help="write accuracy vs round of every method (mean over seeds, min-max band; rounds where "
        "every client was evaluated)",
    )
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from fedvit.report import ReportError, collect, report_methods, to_csv, to_markdown

    if args.paper or args.curves or args.paper_dataset or args.paper_row:  # grouped by method over seeds
        try:
            if args.select != "last":
                raise ReportError("--paper and --curves report the last round (--select last)")
            rows_from = {}
            for item in args.paper_row:
                name, sep, label = item.partition("=")
                if not (sep and name.strip() and label.strip()):
                    raise ReportError(f"--paper-row {item!r}: give NAME=LABEL, e.g. FedBABU=fedbabu-authors")
                rows_from[name.strip()] = label.strip()
            rows, text = report_methods(
                args.run_dirs,
                paper=args.paper,
                paper_dataset=args.paper_dataset,
                paper_rows_from=rows_from,
                curves=args.curves,
            )
        except ReportError as err:
            eprint(f"error: {err}")
            return EXIT_CONFIG
        print(text, end="")
        if args.csv:
            args.csv.write_text(to_csv(rows))
        return 0
    if len(args.run_dirs) == 1 and (args.run_dirs[0] / "sweep.json").is_file():
        from fedvit.sweep import report_sweep

        rows, text = report_sweep(args.run_dirs[0])  # a sweep: mean ± std over seeds
        print(text, end="")
        if args.csv:
            args.csv.write_text(to_csv(rows))
        return 0
    try:
        rows = collect(args.run_dirs, select=args.select)
    except ReportError as err:
        eprint(f"error: {err}")
        return EXIT_CONFIG
    print(to_markdown(rows), end="")
    if args.csv:
        args.csv.write_text(to_csv(rows))
    return 0


# --------------------------------------------------------------------------- pretrain


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train a plain ViT centrally and save a state dict for model.pretrained",
        description="Train the config's ViT (plugins off) on the whole train split of its dataset and "
        "write {'model': state_dict} to --out; print a JSON summary (test accuracy, time).",
    )
    add_run_config_arg(p)
    p.add_argument("--out", type=Path, required=True, metavar="FILE.pt", help="where to write the weights")
    p.add_argument("--epochs", type=int, default=1, help="epochs over the train split (default 1)")
    p.add_argument("--max-examples", type=int, metavar="N", help="a seeded subset of N training examples")
    p.add_argument(
        "--augment",
        default="auto",
        choices=["auto", "none", "crop", "crop-flip", "flip"],
        help="batch augmentation: random crop after padding, horizontal flip (default auto: crop, "
        "and flip RGB images only; never flip characters)",
    )
    p.add_argument("--crop-padding", type=int, default=4, metavar="PX", help="padding before the crop (4)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"], help="lr after warm-up")
    p.add_argument("--warmup", type=float, default=0.0, metavar="EPOCHS", help="linear warm-up epochs (0)")
    p.add_argument("--warmup-steps", type=int, metavar="N", help="linear warm-up steps (overrides --warmup)")
    p.add_argument("--min-lr", type=float, default=0.0, help="the cosine schedule's final lr (0)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing (0)")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="also write the resumable <out>.resume every N steps (always after each epoch)",
    )
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from fedvit.config import load_config
    from fedvit.pretrain import PretrainOptions, pretrain

    opts = PretrainOptions(
        epochs=args.epochs,
        max_examples=args.max_examples,
        augment=args.augment,
        crop_padding=args.crop_padding,
        schedule=args.schedule,
        warmup_epochs=args.warmup,
        warmup_steps=args.warmup_steps,
        min_lr=args.min_lr,
        label_smoothing=args.label_smoothing,
        checkpoint_every=args.checkpoint_every,
    )
    opts.validate()
    summary = pretrain(
        load_config(run_config(args)),
        args.out,
        options=opts,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(json.dumps(summary, indent=2), flush=True)
    return 0


# --------------------------------------------------------------------------- export


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a client's personalized model as a self-contained file for local inference",
        description="Combine the run's checkpointed shared parameters with one client's private "
        "parameters (its state directory) into a torch.export program (.pt2) with the model config "
        "and preprocessing inside (torch.export.load alone loads it; see scripts/predict.py).",
    )
    p.add_argument("state_dir", type=Path, metavar="STATE_DIR", help="the client's state directory")
    p.add_argument("--run-dir", type=Path, metavar="DIR", help="the run directory (config.yaml, checkpoint/)")
    add_run_config_arg(p)
    p.add_argument(
        "--checkpoint", type=Path, metavar="DIR", help="checkpoint directory (default RUN_DIR/checkpoint)"
    )
    p.add_argument("--client-id", type=int, metavar="ID", help="recorded in the export's metadata")
    p.add_argument(
        "--exit",
        type=int,
        metavar="DEPTH",
        help="early-exit models (anytime): cut the model at this exit depth (default: the client's tier)",
    )
    p.add_argument("-o", "--out", type=Path, required=True, metavar="FILE.pt2", help="where to write it")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from fedvit.export import export

    rc = run_config(args) if args.run_config else None
    path = export(
        args.state_dir,
        args.out,
        run_dir=args.run_dir,
        run_config=rc,
        checkpoint=args.checkpoint,
        client_id=args.client_id,
        exit=args.exit,
    )
    print(path, flush=True)
    return 0
