"""The ``candgen`` command line. Each config dataclass's fields become flags one to one
(``chunk_users`` -> ``--chunk-users``), so the CLI, the library and pipeline parameters agree."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from candgen.errors import CandgenError, ConfigError

DEFAULT_MARKETPLACE = Path("data/marketplace")


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = ()
) -> None:
    """Adds one flag per field of the dataclass ``cls``; defaults stay in the dataclass.

    ``exclude`` names fields that get a flag of their own (a nested config, a file).
    """
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (defaults in the dataclass)")
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _unwrap_optional(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required:
            group.add_argument(flag, dest=f.name, type=tp, required=True, help="required")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"default: {default!r}"
        if tp is bool:
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                help=help_text,
            )  # fmt: skip
        elif typing.get_origin(tp) is tuple:
            inner, *rest = typing.get_args(tp)
            nargs: int | str = "+" if rest == [Ellipsis] else 1 + len(rest)
            group.add_argument(
                flag, dest=f.name, type=inner, nargs=nargs, default=None, help=help_text,
            )  # fmt: skip
        else:
            group.add_argument(flag, dest=f.name, type=tp, default=None, help=help_text)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Builds ``cls`` from the flags that were given; the rest keep the dataclass defaults."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }
    for name, value in given.items():
        if isinstance(value, list):
            given[name] = tuple(value)
    return cls(**given)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# -- commands ------------------------------------------------------------------------------------


def cmd_data_synth(args: argparse.Namespace) -> int:
    from candgen.data.synth import SynthConfig, generate

    cfg = config_from_args(SynthConfig, args)
    summary = generate(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    _print_json(
        {
            "out": str(summary.out_dir),
            "rows": summary.rows,
            "events_by_type": summary.events_by_type,
            "snapshot": summary.snapshot,
        }
    )
    return 0


def cmd_data_real(args: argparse.Namespace) -> int:
    from candgen.data.amazon import DATASETS
    from candgen.data.interactions import leave_one_out, summarize

    df = DATASETS[args.dataset](args.data_dir)
    split = leave_one_out(df)
    _print_json(
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


def cmd_features_build(args: argparse.Namespace) -> int:
    from candgen.features.build import FeatureBuildConfig, build_features

    cfg = config_from_args(FeatureBuildConfig, args)
    store_cfg = _store_config(args)
    manifest = build_features(args.data, store_cfg.features_path, cfg, progress=not args.quiet)
    _print_json({"features_dir": str(store_cfg.features_path), **manifest})
    return 0


def cmd_features_long_term(args: argparse.Namespace) -> int:
    from candgen.features.long_term import summarise
    from candgen.training.config import JobConfig
    from candgen.training.long_term import build_long_term_features, summariser_config

    features = _store_config(args).features_path
    if args.model is not None:
        _print_json(summarise(args.model, features, progress=not args.quiet))
        return 0
    config = summariser_config(args.data, args.out_dir, args.eval_days, epochs=args.epochs,
                               seed=args.seed, progress=not args.quiet)  # fmt: skip
    job = JobConfig(nproc=args.nproc) if args.nproc != 1 else None
    _print_json(build_long_term_features(config, features, job))
    return 0


def _store_config(args: argparse.Namespace) -> Any:
    from candgen.features.store import StoreConfig

    return config_from_args(StoreConfig, args)


def cmd_features_apply(args: argparse.Namespace) -> int:
    from candgen.features.store import apply

    _print_json(dataclasses.asdict(apply(_store_config(args))))
    return 0


def _parse_time(field: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            field, f"must be an ISO timestamp like 2026-01-15T00:00:00, got {value!r}"
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def cmd_features_materialize(args: argparse.Namespace) -> int:
    from candgen.features.store import materialize

    end = materialize(_store_config(args), _parse_time("end", args.end))
    _print_json({"materialized_until": end.isoformat()})
    return 0


def cmd_features_online(args: argparse.Namespace) -> int:
    from candgen.features.store import online_features, open_store

    if (args.user_id is None) == (args.ad_id is None):
        raise ConfigError("user_id", "give exactly one of --user-id or --ad-id")
    store = open_store(_store_config(args))
    if args.user_id is not None:
        result = online_features(
            store, [{"user_id": args.user_id}], args.service or "user_features_v1"
        )
    else:
        result = online_features(store, [{"ad_id": args.ad_id}], args.service or "ad_features_v1")
    _print_json({k: v[0] for k, v in result.items()})
    return 0


def cmd_features_push(args: argparse.Namespace) -> int:
    from candgen.features.store import Engagement, open_store, push_engagements

    event = Engagement(
        user_id=args.user_id,
        item_id=args.item_id,
        action_type=args.action_type,
        surface=args.surface,
        timestamp=_parse_time("timestamp", args.timestamp) or datetime.now(UTC),
    )
    push_engagements(open_store(_store_config(args)), [event], max_len=args.max_len)
    _print_json({"pushed": dataclasses.asdict(event)})
    return 0


def cmd_features_serve(args: argparse.Namespace) -> int:
    from candgen.features.store import serve

    print(f"feature server on http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr)
    serve(_store_config(args), args.host, args.port, args.workers)
    return 0


def cmd_features_training_set(args: argparse.Namespace) -> int:
    from candgen.features.store import open_store
    from candgen.features.training_set import write_training_set

    store = open_store(_store_config(args))
    _print_json(write_training_set(args.data, store, args.out, args.label, args.service,
                                   args.limit))  # fmt: skip
    return 0


def _train_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    headline = ("hr@10", "ndcg@10", "recall@50", "recall@100", "coverage@100", "users")
    return {
        "out_dir": metrics["config"]["out_dir"],
        "test": {k: metrics["test"][k] for k in headline if k in metrics["test"]},
        "valid": {k: metrics["valid"][k] for k in headline if k in metrics["valid"]},
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
    _print_json(_train_summary(metrics))
    if cfg.track:
        from candgen.registry.tracking import default_tracking_uri

        uri = cfg.tracking_uri or default_tracking_uri()
        print(f"MLflow: mlflow ui --backend-store-uri {uri}", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from candgen.evaluation.evaluate import compare_saved_models, evaluate_saved_model

    if args.against is not None:
        _print_json(compare_saved_models(args.model, args.against, args.split, args.k))
        return 0
    out = evaluate_saved_model(args.model, args.split, args.protocol or "")
    out.pop("primary_metric")
    _print_json(out)
    return 0


def cmd_registry_register(args: argparse.Namespace) -> int:
    from candgen.registry.tracking import register

    _print_json(register(args.run_id, args.name, args.primary_metric, args.tracking_uri))
    return 0


def cmd_registry_promote(args: argparse.Namespace) -> int:
    from candgen.registry.tracking import promote

    _print_json(promote(args.name, args.tracking_uri))
    return 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    from candgen.registry.tracking import describe

    _print_json(describe(args.name, args.tracking_uri))
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from candgen.index.ann import IndexConfig
    from candgen.index.build import build_index

    cfg = config_from_args(IndexConfig, args)
    _print_json(build_index(args.model_uri, args.out, cfg, ads_only=not args.all_items,
                            recall_k=args.recall_k, tracking_uri=args.tracking_uri))  # fmt: skip
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from candgen.endpoint.runtime import ServerConfig, start, status, stop

    cfg = config_from_args(ServerConfig, args)
    if args.stop:
        _print_json({"stopped": stop(cfg)})
    elif args.status:
        _print_json(status(cfg))
    else:
        info = start(cfg)
        _print_json({k: info[k] for k in ("pid", "http", "grpc", "metrics", "models", "log")})
    return 0


def cmd_serving_export(args: argparse.Namespace) -> int:
    from candgen.endpoint.export import ExportConfig, export
    from candgen.index.ann import IndexConfig
    from candgen.serving.steps import ServingConfig

    serving_fields = {}
    for field_name, path in (("weights", args.weights_file),
                             ("quota_overrides", args.quota_overrides_file)):  # fmt: skip
        if path is None:
            continue
        try:
            serving_fields[field_name] = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(field_name, f"cannot read {path}: {e}") from None
        if not isinstance(serving_fields[field_name], dict):
            raise ConfigError(field_name, "the file must hold {surface: {generator: share}}")
    serving = dataclasses.replace(config_from_args(ServingConfig, args), **serving_fields)
    cfg = dataclasses.replace(
        config_from_args(ExportConfig, args),
        serving=serving,
        index=config_from_args(IndexConfig, args),
    )
    _print_json(export(cfg))
    return 0


def cmd_quotas_learn(args: argparse.Namespace) -> int:
    from candgen.quotas.learning import QuotaLearnConfig, learn_quotas

    config = config_from_args(QuotaLearnConfig, args)
    learned = learn_quotas(args.model, args.data, args.features_dir, config, args.index_dir,
                           progress=not args.quiet)  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    learned.save(Path(args.out))
    _print_json({"out": str(args.out), "activity_edges": learned.activity_edges,
                 **learned.fitted})  # fmt: skip
    return 0


def cmd_quotas_compare(args: argparse.Namespace) -> int:
    from candgen.quotas.learning import (
        QuotaLearnConfig,
        compare_policies,
        fit,
        replay_window,
    )
    from candgen.serving.quota import DEFAULT_WEIGHTS

    ks = sorted(set(args.k))
    if ks[0] < 1:
        raise ConfigError("k", f"must be >= 1, got {ks[0]}")
    config = config_from_args(QuotaLearnConfig, args)
    if config.max_rank < ks[-1]:
        raise ConfigError("max_rank", f"must be >= the largest K ({ks[-1]}), got {config.max_rank}")
    replays = {w: replay_window(args.model, args.data, args.features_dir, config, w,
                                args.index_dir, progress=not args.quiet)
               for w in ("valid", "test")}  # fmt: skip
    learned = fit(replays["valid"], config)
    result = {"fit_requests": len(replays["valid"]), "test_requests": len(replays["test"]),
              "activity_edges": learned.activity_edges,
              "prior_strength": learned.fitted["prior_strength"],
              "policies": compare_policies(replays["valid"], replays["test"], learned, ks,
                                           DEFAULT_WEIGHTS)}  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    _print_json(result)
    return 0


def cmd_quotas_show(args: argparse.Namespace) -> int:
    from candgen.serving.quota import LearnedQuotas, QuotaPolicy, describe

    if (args.table is None) == (args.model_repository is None):
        raise ConfigError("table", "give a learned table or --model-repository, not both")
    if args.model_repository is not None:
        from candgen.serving.steps import SelectStep, pinned_version, read_serving_file

        folder = args.model_repository / SelectStep.MODEL / str(pinned_version(
            args.model_repository))  # fmt: skip
        policy = read_serving_file(folder)[0].policy(folder)
    else:
        policy = QuotaPolicy("learned", learned=LearnedQuotas.load(args.table))
    if args.k < 1:
        raise ConfigError("k", f"must be >= 1, got {args.k}")
    rows = describe(policy, args.k)
    if args.json:
        _print_json(rows)
        return 0
    print(f"quota policy {policy.policy}; slots of K={args.k} per context")
    for row in rows:
        slots = ", ".join(f"{g} {n}" for g, n in row["slots"].items())
        print(f"  {row['surface']:<8} {row['activity']:<8} {row['source']:<9} {slots}")
    return 0


def cmd_serving_swap(args: argparse.Namespace) -> int:
    from candgen.endpoint.export import swap

    _print_json(swap(args.url, args.model_repository, args.protocol))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from candgen.endpoint.client import RetrieveClient

    client = RetrieveClient(args.url, args.protocol, timeout_s=args.timeout_s)
    recent = [int(x) for x in args.recent.split(",") if x.strip()] if args.recent else []
    res = client.retrieve(args.user_id, args.scenario, args.k, recent)
    if args.json:
        _print_json(dataclasses.asdict(res))
        return 0
    flags = [f for f, on in (("cold_start", res.cold_start), ("fallback", res.fallback)) if on]
    print(f"user {args.user_id} on {args.scenario}: {len(res.ad_ids)} ads via "
          f"{client.protocol}://{client.url}"
          + (f"  [{', '.join(flags)}]" if flags else ""))  # fmt: skip
    print(f"  by generator ({res.quota_policy} quotas): "
          + ", ".join(f"{s} {n}" for s, n in res.source_counts.items()))  # fmt: skip
    print(f"  {'rank':>4}  {'ad_id':>12}  {'score':>8}  source")
    for rank, (ad, score, source) in enumerate(zip(res.ad_ids, res.scores, res.sources,
                                                   strict=True), 1):  # fmt: skip
        print(f"  {rank:>4}  {ad:>12}  {score:>8.4f}  {source}")
    return 0


def cmd_pipeline_compile(args: argparse.Namespace) -> int:
    from candgen.orchestrate import compile_pipeline

    print(compile_pipeline(args.out))
    return 0


def cmd_pipeline_run(args: argparse.Namespace) -> int:
    from candgen.orchestrate import parse_overrides, run_local

    if not args.local:
        raise ConfigError("local", "only --local runs here; `candgen pipeline submit` sends the "
                          "compiled pipeline to a Kubeflow Pipelines server")  # fmt: skip
    run = run_local(parse_overrides(args.set), args.pipeline_root)
    print(f"\nrun folder: {run.run_dir}")
    for task, outcome in run.outcomes():
        print(f"  {task:<18} {outcome}")
    print(run.message)
    return 0


def cmd_pipeline_submit(args: argparse.Namespace) -> int:
    from candgen.orchestrate import parse_overrides, submit

    _print_json(submit(args.host, parse_overrides(args.set), args.experiment, args.run_name,
                       args.namespace, args.package))  # fmt: skip
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from candgen.demo import run_demo

    return run_demo(Path(args.workdir), users=args.users, ads=args.ads, days=args.days)


# -- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from candgen.data.synth import SynthConfig
    from candgen.features.build import FeatureBuildConfig
    from candgen.features.store import ACTION_TYPES, StoreConfig

    p = argparse.ArgumentParser(prog="candgen", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="real and synthetic data").add_subparsers(
        dest="data_command", required=True
    )
    synth = data.add_parser("synth", help="write a synthetic ads marketplace (parquet)")
    synth.add_argument("--out", type=Path, default=DEFAULT_MARKETPLACE)
    synth.add_argument("--overwrite", action="store_true", help="replace --out if it has files")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(synth, SynthConfig)
    synth.set_defaults(func=cmd_data_synth)

    real = data.add_parser("real", help="load a real set and print its counts and split sizes")
    real.add_argument("--dataset", choices=["beauty", "games"], required=True)
    real.add_argument("--data-dir", type=Path, default=None, help="default: ../shared/data")
    real.set_defaults(func=cmd_data_real)

    feats = sub.add_parser("features", help="the Feast feature store").add_subparsers(
        dest="features_command", required=True
    )

    def store_cmd(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        sp = feats.add_parser(name, help=help_text)
        add_config_flags(sp, StoreConfig)
        sp.set_defaults(func=func)
        return sp

    build = store_cmd("build", "compute the offline feature tables from a marketplace",
                      cmd_features_build)  # fmt: skip
    build.add_argument("--data", type=Path, default=DEFAULT_MARKETPLACE)
    build.add_argument("--quiet", action="store_true")
    add_config_flags(build, FeatureBuildConfig)
    from candgen.training.long_term import SUMMARISER

    lt = store_cmd("long-term", "train the long-term summariser (dense all-action objective) and "
                   "write its daily summaries (user_long_term_embedding)",
                   cmd_features_long_term)  # fmt: skip
    lt.add_argument("--data", type=Path, default=DEFAULT_MARKETPLACE)
    lt.add_argument(
        "--model",
        type=Path,
        default=None,
        help="summarise with this trained summariser (model.pt), no training",
    )
    lt.add_argument("--out-dir", default="runs/long-term", help="where the summariser goes")
    lt.add_argument("--eval-days", type=int, default=1,
                    help="the eval_days of the models that read the summaries (the summariser "
                    "then never trains on their evaluation windows)")  # fmt: skip
    lt.add_argument("--epochs", type=int, default=SUMMARISER["epochs"])
    lt.add_argument("--seed", type=int, default=42)
    lt.add_argument("--nproc", type=int, default=1, help="> 1: a TorchX job (DDP)")
    lt.add_argument("--quiet", action="store_true")
    store_cmd("apply", "register the feature repository (feast apply)", cmd_features_apply)
    mat = store_cmd("materialize", "load features into the online store (incremental)",
                    cmd_features_materialize)  # fmt: skip
    mat.add_argument("--end", default=None, help="ISO time; default: the end of the data")
    online = store_cmd("online", "look up one user's or ad's online features", cmd_features_online)
    online.add_argument("--user-id", type=int)
    online.add_argument("--ad-id", type=int)
    online.add_argument("--service", default=None)
    push = store_cmd("push", "append a real-time engagement to a user's short-term sequence",
                     cmd_features_push)  # fmt: skip
    push.add_argument("--user-id", type=int, required=True)
    push.add_argument("--item-id", type=int, required=True)
    push.add_argument("--action-type", choices=ACTION_TYPES, default="click")
    push.add_argument("--surface", default="home")
    push.add_argument("--timestamp", default=None, help="ISO time; default: now")
    push.add_argument("--max-len", type=int, default=20)
    fsrv = store_cmd("serve", "run the Feast feature server (HTTP) for the serving runtime",
                     cmd_features_serve)  # fmt: skip
    fsrv.add_argument("--host", default="127.0.0.1")
    fsrv.add_argument("--port", type=int, default=6566)
    fsrv.add_argument("--workers", type=int, default=1)
    ts = store_cmd("training-set", "point-in-time training rows for a label",
                   cmd_features_training_set)  # fmt: skip
    ts.add_argument("--data", type=Path, default=DEFAULT_MARKETPLACE)
    ts.add_argument("--label", choices=["click", "conversion"], default="click")
    ts.add_argument("--service", default="training_v1")
    ts.add_argument("--limit", type=int, default=0, help="sample this many rows (0: all)")
    ts.add_argument("--out", type=Path, required=True)

    from candgen.training.config import JobConfig, TrainConfig

    tr = sub.add_parser("train", help="train a retrieval model (in-process, or a TorchX job)")
    tr.add_argument("--nproc", type=int, default=1,
                    help="processes per replica; > 1 launches a TorchX job (DDP)")  # fmt: skip
    tr.add_argument("--torchx", action="store_true", help="launch through TorchX even for 1")
    tr.add_argument("--dryrun", action="store_true",
                    help="with --scheduler kubernetes: print the Volcano job TorchX would submit "
                    "(its own dry run, no cluster needed) instead of training")  # fmt: skip
    add_config_flags(tr, JobConfig, exclude=("nproc",))
    add_config_flags(tr, TrainConfig)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a model.pt against the popularity baseline")
    ev.add_argument("--model", type=Path, required=True)
    ev.add_argument("--split", choices=["valid", "test"], default="test")
    ev.add_argument("--protocol", choices=["full", "sampled100"], default=None)
    ev.add_argument("--against", type=Path, default=None,
                    help="another model.pt on the same data: print recall@K of --model minus "
                    "its, per user, overall and per label and surface, with 95%% paired "
                    "bootstrap intervals")  # fmt: skip
    ev.add_argument("-k", type=int, default=100, help="K of the --against comparison")
    ev.set_defaults(func=cmd_evaluate)

    reg = sub.add_parser("registry", help="the MLflow model registry").add_subparsers(
        dest="registry_command", required=True
    )

    def reg_cmd(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        sp = reg.add_parser(name, help=help_text)
        sp.add_argument("--name", required=True, help="registered model name")
        sp.add_argument("--tracking-uri", default="", help="default: sqlite under the repo")
        sp.set_defaults(func=func)
        return sp

    r = reg_cmd("register", "register a run's model as the challenger", cmd_registry_register)
    r.add_argument("--run-id", required=True)
    r.add_argument("--primary-metric", default="ndcg@10")
    reg_cmd("promote", "move champion to the challenger if it is at least as good",
            cmd_registry_promote)  # fmt: skip
    reg_cmd("show", "list versions, aliases and lineage tags", cmd_registry_show)

    from candgen.index.ann import IndexConfig

    idx = sub.add_parser("index", help="the FAISS serving index").add_subparsers(
        dest="index_command", required=True
    )
    ib = idx.add_parser("build", help="index a registered version's ad embeddings, log recall")
    ib.add_argument("--model-uri", required=True, help="e.g. models:/ads-hstu@champion")
    ib.add_argument("--out", type=Path, default=Path("data/index"))
    ib.add_argument("--all-items", action="store_true", help="index every item, not only ads")
    ib.add_argument("--recall-k", type=int, default=100)
    ib.add_argument("--tracking-uri", default="", help="default: sqlite under the repo")
    add_config_flags(ib, IndexConfig)
    ib.set_defaults(func=cmd_index_build)

    from candgen.endpoint.runtime import ServerConfig

    serve = sub.add_parser("serve", help="start (or --stop) the local tritonserver")
    serve.add_argument("--stop", action="store_true", help="stop the running server")
    serve.add_argument("--status", action="store_true", help="print whether it runs")
    add_config_flags(serve, ServerConfig)
    serve.set_defaults(func=cmd_serve)

    from candgen.endpoint.export import ExportConfig
    from candgen.serving.steps import ServingConfig

    srv = sub.add_parser("serving", help="the Triton model repository").add_subparsers(
        dest="serving_command", required=True
    )
    ex = srv.add_parser("export", help="export a registered version as the retrieve ensemble")
    add_config_flags(ex, ExportConfig, exclude=("serving", "index"))
    add_config_flags(ex, ServingConfig, exclude=("weights", "quota_overrides"))
    ex.add_argument("--weights", dest="weights_file", default=None,
                    help="JSON: surface -> generator -> share of the fixed policy (default: "
                    "built in)")  # fmt: skip
    ex.add_argument("--quota-overrides", dest="quota_overrides_file", default=None,
                    help="JSON: surface -> generator -> share, used for that surface whatever "
                    "the policy")  # fmt: skip
    add_config_flags(ex, IndexConfig)
    ex.set_defaults(func=cmd_serving_export)
    sw = srv.add_parser("swap", help="load the repository's pinned version into a live server")
    sw.add_argument("--model-repository", type=Path, default=Path("data/model_repository"))
    sw.add_argument("--url", default="127.0.0.1:8000")
    sw.add_argument("--protocol", choices=["http", "grpc"], default="http")
    sw.set_defaults(func=cmd_serving_swap)

    from candgen.quotas.learning import QuotaLearnConfig

    quotas = sub.add_parser("quotas", help="the quotas across candidate generators").add_subparsers(
        dest="quotas_command", required=True
    )
    ql = quotas.add_parser("learn", help="fit each generator's value per slot from the logged "
                           "outcomes of the model's validation window")  # fmt: skip
    ql.add_argument("--model", type=Path, required=True, help="the trained model.pt")
    ql.add_argument("--data", type=Path, default=DEFAULT_MARKETPLACE)
    ql.add_argument("--features-dir", type=Path, default=Path("feature_repo/data/features"))
    ql.add_argument(
        "--index-dir",
        type=Path,
        default=None,
        help="the model's index (candgen index build); default: exact search",
    )
    ql.add_argument("--out", type=Path, default=Path("data/quotas.json"))
    ql.add_argument("--quiet", action="store_true")
    add_config_flags(ql, QuotaLearnConfig)
    ql.set_defaults(func=cmd_quotas_learn)
    qc = quotas.add_parser("compare", help="learned quotas vs the best fixed split, snake merge "
                           "and the hand-set weights: recall by label on the model's test window, "
                           "fitted on its validation window")  # fmt: skip
    qc.add_argument("--model", type=Path, required=True, help="the trained model.pt")
    qc.add_argument("--data", type=Path, default=DEFAULT_MARKETPLACE)
    qc.add_argument("--features-dir", type=Path, default=Path("feature_repo/data/features"))
    qc.add_argument("--index-dir", type=Path, default=None)
    qc.add_argument("-k", "--k", type=int, nargs="+", default=[50, 100, 200])
    qc.add_argument("--out", type=Path, default=None, help="also write the result here (JSON)")
    qc.add_argument("--quiet", action="store_true")
    add_config_flags(qc, QuotaLearnConfig)
    qc.set_defaults(func=cmd_quotas_compare)
    qs = quotas.add_parser("show", help="print the slots each generator gets per context")
    qs.add_argument("table", type=Path, nargs="?", default=None, help="a learned table")
    qs.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        help="the policy an exported repository serves (its pinned version)",
    )
    qs.add_argument("-k", "--k", type=int, default=100)
    qs.add_argument("--json", action="store_true")
    qs.set_defaults(func=cmd_quotas_show)

    q = sub.add_parser("query", help="ask the live retrieve ensemble for a user's candidates")
    q.add_argument("user_id", type=int)
    q.add_argument("--scenario", default="home", help="home | search | related")
    q.add_argument("-k", "--k", type=int, default=100)
    q.add_argument("--recent", default="", help="real-time item ids, comma-separated")
    q.add_argument("--protocol", choices=["http", "grpc"], default="http")
    q.add_argument("--url", default="", help="default: 127.0.0.1:8000 (http), :8001 (grpc)")
    q.add_argument("--timeout-s", type=float, default=10.0)
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.set_defaults(func=cmd_query)

    from candgen.orchestrate import PIPELINE_YAML

    pipe = sub.add_parser("pipeline", help="the KFP v2 retrieval pipeline").add_subparsers(
        dest="pipeline_command", required=True
    )
    pc = pipe.add_parser("compile", help="write the pipeline's YAML (checked in)")
    pc.add_argument("--out", type=Path, default=PIPELINE_YAML)
    pc.set_defaults(func=cmd_pipeline_compile)
    pr = pipe.add_parser("run", help="run the whole pipeline with kfp.local")
    pr.add_argument("--local", action="store_true", help="kfp.local SubprocessRunner (required)")
    pr.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a pipeline parameter, e.g. --set epochs=5 (repeatable)")  # fmt: skip
    pr.add_argument("--pipeline-root", type=Path, default=Path("data/pipeline_root"))
    pr.set_defaults(func=cmd_pipeline_run)
    ps = pipe.add_parser("submit", help="submit the compiled pipeline to a KFP server")
    ps.add_argument("--host", required=True, help="the KFP API, e.g. http://ml-pipeline:8888")
    ps.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ps.add_argument("--experiment", default="candgen")
    ps.add_argument("--run-name", default="")
    ps.add_argument("--namespace", default="", help="multi-user KFP: the profile namespace")
    ps.add_argument("--package", type=Path, default=PIPELINE_YAML)
    ps.set_defaults(func=cmd_pipeline_submit)

    demo = sub.add_parser("demo", help="the end-to-end demo on a small synthetic marketplace")
    demo.add_argument("--workdir", default="data/demo")
    demo.add_argument("--users", type=int, default=1_000)
    demo.add_argument("--ads", type=int, default=1_500)
    demo.add_argument("--days", type=int, default=14)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # ibis (Feast's DuckDB offline store) calls a method that DuckDB 2 deprecates.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="ibis")
    # MLflow's SQL store configures a SQLAlchemy loader that SQLAlchemy 2 deprecates.
    warnings.filterwarnings("ignore", message="The ``noload`` loader strategy")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CandgenError as e:
        print(f"candgen: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
