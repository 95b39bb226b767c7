"""``candgen demo``: the end-to-end demo on a small synthetic marketplace."""

from __future__ import annotations

import argparse
from pathlib import Path

from candgen.cli import Parser
from candgen.cli.flags import check_at_least
from candgen.errors import ConfigError


def cmd_demo(args: argparse.Namespace) -> int:
    for name in ("users", "ads", "days"):
        check_at_least(name, getattr(args, name), 1)
    workdir = Path(args.workdir).resolve()
    # The demo deletes its workdir first: never the folder the user stands in, or one above it.
    if workdir == Path.cwd().resolve() or workdir in Path.cwd().resolve().parents:
        raise ConfigError(
            "workdir",
            f"{args.workdir} holds the current folder; the demo deletes "
            "its workdir, so give a folder of its own (default: data/demo)",
        )
    from candgen.demo import run_demo

    return run_demo(workdir, users=args.users, ads=args.ads, days=args.days)


def add_commands(sub: argparse._SubParsersAction[Parser]) -> None:
    demo = sub.add_parser("demo", help="the end-to-end demo on a small synthetic marketplace")
    demo.add_argument(
        "--workdir",
        default="data/demo",
        help="the demo's folder (replaced: whatever it holds is deleted)",
    )
    demo.add_argument("--users", type=int, default=1_000, help="users of the marketplace")
    demo.add_argument("--ads", type=int, default=1_500, help="ads of the marketplace")
    demo.add_argument("--days", type=int, default=14, help="simulated days of events")
    demo.set_defaults(func=cmd_demo)
