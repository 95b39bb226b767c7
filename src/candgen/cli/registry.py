"""``candgen registry``: the MLflow model registry (register a run, promote, show)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from candgen.cli import Parser, print_json
from candgen.cli.flags import check_not_empty
from candgen.errors import ConfigError

TRACKING_HELP = "MLflow tracking URI (default: sqlite:///<repo>/mlflow.db)"


def cmd_registry_register(args: argparse.Namespace) -> int:
    check_not_empty("name", args.name)
    check_not_empty("run_id", args.run_id)
    metric, _, k = args.primary_metric.partition("@")
    if metric not in ("hr", "ndcg", "recall") or not k.isdigit():
        raise ConfigError(
            "primary_metric", f"expected hr@K, ndcg@K or recall@K, got {args.primary_metric!r}"
        )
    from candgen.registry.tracking import register

    print_json(register(args.run_id, args.name, args.primary_metric, args.tracking_uri))
    return 0


def cmd_registry_promote(args: argparse.Namespace) -> int:
    check_not_empty("name", args.name)
    from candgen.registry.tracking import promote

    print_json(promote(args.name, args.tracking_uri))
    return 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    check_not_empty("name", args.name)
    from candgen.registry.tracking import describe

    print_json(describe(args.name, args.tracking_uri))
    return 0


def add_commands(sub: argparse._SubParsersAction[Parser]) -> None:
    reg = sub.add_parser("registry", help="the MLflow model registry").add_subparsers(
        dest="registry_command", required=True
    )

    def reg_cmd(
        name: str, help_text: str, func: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        sp = reg.add_parser(name, help=help_text)
        sp.add_argument("--name", required=True, help="registered model name")
        sp.add_argument("--tracking-uri", default="", help=TRACKING_HELP)
        sp.set_defaults(func=func)
        return sp

    r = reg_cmd("register", "register a run's model as the challenger", cmd_registry_register)
    r.add_argument("--run-id", required=True, help="the MLflow run whose model to register")
    r.add_argument(
        "--primary-metric",
        default="ndcg@10",
        help="hr@K, ndcg@K or recall@K: the run's test metric that promotion compares",
    )
    reg_cmd(
        "promote",
        "move champion to the challenger if it is at least as good",
        cmd_registry_promote,
    )
    reg_cmd("show", "list versions, aliases and lineage tags", cmd_registry_show)
