"""``candgen data``: write a synthetic marketplace, or load a real set and count it."""

from __future__ import annotations

import argparse
from pathlib import Path

from candgen.cli import DEFAULT_MARKETPLACE, Parser, add_config_flags, config_from_args, print_json
from candgen.errors import ConfigError

REAL_DATASETS = ("beauty", "games")


def cmd_data_synth(args: argparse.Namespace) -> int:
    from candgen.data.synth import SynthConfig, generate

    cfg = config_from_args(SynthConfig, args)
    summary = generate(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print_json(
        {
            "out": str(summary.out_dir),
            "rows": summary.rows,
            "events_by_type": summary.events_by_type,
            "snapshot": summary.snapshot,
        }
    )
    return 0


def cmd_data_real(args: argparse.Namespace) -> int:
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise ConfigError("data_dir", f"{args.data_dir} is not a folder")
    from candgen.data.amazon import DATASETS
    from candgen.data.interactions import leave_one_out, summarize

    df = DATASETS[args.dataset](args.data_dir)
    split = leave_one_out(df)
    print_json(
        {
            "dataset": args.dataset,
            **summarize(df),
            "split": {
                "train": len(split.train),
                "valid": len(split.valid),
                "test": len(split.test),
            },
        }
    )
    return 0


def add_commands(sub: argparse._SubParsersAction[Parser]) -> None:
    from candgen.data.synth import SynthConfig

    data = sub.add_parser("data", help="real and synthetic data").add_subparsers(
        dest="data_command", required=True
    )
    synth = data.add_parser("synth", help="write a synthetic ads marketplace (parquet)")
    synth.add_argument(
        "--out", type=Path, default=DEFAULT_MARKETPLACE, help="the folder the marketplace goes to"
    )
    synth.add_argument("--overwrite", action="store_true", help="replace --out if it has files")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(synth, SynthConfig)
    synth.set_defaults(func=cmd_data_synth)

    real = data.add_parser("real", help="load a real set and print its counts and split sizes")
    real.add_argument(
        "--dataset",
        choices=REAL_DATASETS,
        required=True,
        help="Amazon Beauty (S3-Rec preprocessing) or Amazon Games (SASRec paper)",
    )
    real.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the folder holding the set's files (default: ../shared/data)",
    )
    real.set_defaults(func=cmd_data_real)
