"""``candgen train`` (in-process, a TorchX job, or a Kubernetes job's dry run) and
``candgen evaluate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from candgen.cli import Parser, add_config_flags, config_from_args, print_json
from candgen.cli.flags import check_at_least
from candgen.errors import ConfigError

HEADLINE = ("hr@10", "ndcg@10", "recall@50", "recall@100", "coverage@100", "users")


def _train_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "out_dir": metrics["config"]["out_dir"],
        "test": {k: metrics["test"][k] for k in HEADLINE if k in metrics["test"]},
        "valid": {k: metrics["valid"][k] for k in HEADLINE if k in metrics["valid"]},
        "best_epoch": metrics["best_epoch"],
        "wall_seconds": round(metrics["wall_seconds"], 1),
        "world_size": metrics["world_size"],
        **{k: metrics[k] for k in ("run_id", "registered") if k in metrics},
    }


def cmd_train(args: argparse.Namespace) -> int:
    from candgen.training.config import JobConfig, TrainConfig

    cfg = config_from_args(TrainConfig, args)
    job = config_from_args(JobConfig, args)
    if args.dryrun:
        import yaml

        from candgen.training.launch import kubernetes_job

        print(yaml.safe_dump(kubernetes_job(cfg, job), sort_keys=False))
        return 0
    if job.scheduler == "kubernetes" or job.nproc > 1 or args.torchx:
        from candgen.training.launch import launch

        metrics = launch(cfg, job)
    else:
        from candgen.training.trainer import _result_json, train

        result = train(cfg)
        if result.valid_metrics == {}:  # a non-zero rank under torchrun: rank 0 reports
            return 0
        metrics = _result_json(result)
    print_json(_train_summary(metrics))
    if cfg.track:
        from candgen.registry.tracking import default_tracking_uri

        uri = cfg.tracking_uri or default_tracking_uri()
        print(f"MLflow: mlflow ui --backend-store-uri {uri}", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    check_at_least("k", args.k, 1)
    from candgen.evaluation.evaluate import (
        compare_saved_models,
        compare_union,
        evaluate_saved_model,
    )

    context = not args.no_context
    if args.against is not None and args.union is not None:
        raise ConfigError("union", "--union and --against are two comparisons: give one")
    if args.union is not None:
        print_json(compare_union(args.model, args.union, args.split, args.k, args.share))
        return 0
    if args.against is not None:
        print_json(
            compare_saved_models(
                args.model, args.against, args.split, args.k, baseline_context=context
            )
        )
        return 0
    out = evaluate_saved_model(args.model, args.split, args.protocol or "", context=context)
    out.pop("primary_metric")
    print_json(out)
    return 0


def add_commands(sub: argparse._SubParsersAction[Parser]) -> None:
    from candgen.training.config import JobConfig, TrainConfig

    tr = sub.add_parser("train", help="train a retrieval model (in-process, or a TorchX job)")
    tr.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes per replica; > 1 launches a TorchX job (DDP)",
    )
    tr.add_argument("--torchx", action="store_true", help="launch through TorchX even for 1")
    tr.add_argument(
        "--dryrun",
        action="store_true",
        help="with --scheduler kubernetes: print the Volcano job TorchX would submit (its own "
        "dry run, no cluster needed) instead of training",
    )
    add_config_flags(tr, JobConfig, exclude=("nproc",))
    add_config_flags(tr, TrainConfig)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a model.pt against the popularity baseline")
    ev.add_argument("--model", type=Path, required=True, help="the trained model.pt")
    ev.add_argument(
        "--split", choices=["valid", "test"], default="test", help="the window to evaluate on"
    )
    ev.add_argument(
        "--protocol",
        choices=["full", "sampled100"],
        default=None,
        help="rank against every item (full) or against 100 sampled negatives; default: the "
        "protocol the model was trained with",
    )
    ev.add_argument(
        "--against",
        type=Path,
        default=None,
        help="another model.pt on the same data: print recall@K of --model minus its, per user, "
        "overall and per label and surface, with 95%% paired bootstrap intervals",
    )
    ev.add_argument(
        "--union",
        type=Path,
        default=None,
        help="a generative model.pt on the same data: print recall@K of --model's top K-S "
        "joined with its top S minus --model's top K alone, per user, overall and per label, "
        "surface and cold-start ads, with 95%% paired bootstrap intervals",
    )
    ev.add_argument(
        "--share",
        type=int,
        default=0,
        help="S of --union: the generative model's slots of K (default 0: chosen on the "
        "validation window)",
    )
    ev.add_argument("-k", type=int, default=100, help="K of the --against or --union comparison")
    ev.add_argument(
        "--no-context",
        action="store_true",
        help="rank without each request's search query and context item (its surface and label "
        "stay): alone, the model's context-free metrics; with --against, the baseline is ranked "
        "so (--against the same model.pt: what the context is worth, paired per user)",
    )
    ev.set_defaults(func=cmd_evaluate)
