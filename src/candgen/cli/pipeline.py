"""``candgen pipeline``: the KFP v2 retrieval pipeline (compile, run locally, submit)."""

from __future__ import annotations

import argparse
from pathlib import Path

from candgen.cli import Parser, print_json
from candgen.errors import ConfigError

SET_HELP = "a pipeline parameter, e.g. --set epochs=5 (repeatable)"


def cmd_pipeline_compile(args: argparse.Namespace) -> int:
    if args.out.is_dir():
        raise ConfigError("out", f"{args.out} is a folder; give the YAML file to write")
    from candgen.orchestrate import compile_pipeline

    print(compile_pipeline(args.out))
    return 0


def cmd_pipeline_run(args: argparse.Namespace) -> int:
    if not args.local:
        raise ConfigError(
            "local",
            "only --local runs here; `candgen pipeline submit` sends the compiled pipeline to a "
            "Kubeflow Pipelines server",
        )
    from candgen.orchestrate import parse_overrides, run_local

    run = run_local(parse_overrides(args.set), args.pipeline_root)
    print(f"\nrun folder: {run.run_dir}")
    for task, outcome in run.outcomes():
        print(f"  {task:<18} {outcome}")
    print(run.message)
    return 0


def cmd_pipeline_submit(args: argparse.Namespace) -> int:
    # Checked here too (submit checks it), before the pipeline's import takes its seconds.
    if not args.host.startswith(("http://", "https://")):
        raise ConfigError("host", f"must be the KFP API's http(s) URL, got {args.host!r}")
    from candgen.orchestrate import parse_overrides, submit

    print_json(
        submit(
            args.host,
            parse_overrides(args.set),
            args.experiment,
            args.run_name,
            args.namespace,
            args.package,
        )
    )
    return 0


def add_commands(sub: argparse._SubParsersAction[Parser]) -> None:
    from candgen.orchestrate import PIPELINE_YAML

    pipe = sub.add_parser("pipeline", help="the KFP v2 retrieval pipeline").add_subparsers(
        dest="pipeline_command", required=True
    )
    pc = pipe.add_parser("compile", help="write the pipeline's YAML (checked in)")
    pc.add_argument("--out", type=Path, default=PIPELINE_YAML, help="the YAML file to write")
    pc.set_defaults(func=cmd_pipeline_compile)

    pr = pipe.add_parser("run", help="run the whole pipeline with kfp.local")
    pr.add_argument("--local", action="store_true", help="kfp.local SubprocessRunner (required)")
    pr.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help=SET_HELP)
    pr.add_argument(
        "--pipeline-root",
        type=Path,
        default=Path("data/pipeline_root"),
        help="where each run's folder (every task's artifacts and outputs) goes",
    )
    pr.set_defaults(func=cmd_pipeline_run)

    ps = pipe.add_parser("submit", help="submit the compiled pipeline to a KFP server")
    ps.add_argument("--host", required=True, help="the KFP API, e.g. http://ml-pipeline:8888")
    ps.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help=SET_HELP)
    ps.add_argument("--experiment", default="candgen", help="the KFP experiment of the run")
    ps.add_argument("--run-name", default="", help="the run's name; default: KFP's")
    ps.add_argument("--namespace", default="", help="multi-user KFP: the profile namespace")
    ps.add_argument(
        "--package",
        type=Path,
        default=PIPELINE_YAML,
        help="the compiled pipeline (candgen pipeline compile)",
    )
    ps.set_defaults(func=cmd_pipeline_submit)
