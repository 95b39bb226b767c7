"""``candgen features``: the Feast feature store (offline tables, the long-term summaries,
registry, online store, real-time pushes, the feature server, training sets)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from candgen.cli import DEFAULT_MARKETPLACE, Parser, add_config_flags, config_from_args, print_json
from candgen.cli.flags import check_at_least, check_port
from candgen.errors import ConfigError

USER_SERVICE = "user_features_v1"
AD_SERVICE = "ad_features_v1"


def _store_config(args: argparse.Namespace) -> Any:
    from candgen.features.store import StoreConfig

    return config_from_args(StoreConfig, args)


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


def cmd_features_build(args: argparse.Namespace) -> int:
    from candgen.features.build import FeatureBuildConfig, build_features

    cfg = config_from_args(FeatureBuildConfig, args)
    store_cfg = _store_config(args)
    manifest = build_features(args.data, store_cfg.features_path, cfg, progress=not args.quiet)
    print_json({"features_dir": str(store_cfg.features_path), **manifest})
    return 0


def cmd_features_long_term(args: argparse.Namespace) -> int:
    from candgen.training.config import JobConfig
    from candgen.training.long_term import SummariserConfig, build_long_term_features

    features = _store_config(args).features_path
    if args.model is not None:
        from candgen.features.long_term import summarise

        print_json(summarise(args.model, features, progress=not args.quiet))
        return 0
    check_at_least("nproc", args.nproc, 1)
    config = config_from_args(SummariserConfig, args).train_config(
        args.data, progress=not args.quiet
    )
    job = JobConfig(nproc=args.nproc) if args.nproc != 1 else None
    print_json(build_long_term_features(config, features, job))
    return 0


def cmd_features_apply(args: argparse.Namespace) -> int:
    from candgen.features.store import apply

    print_json(dataclasses.asdict(apply(_store_config(args))))
    return 0


def cmd_features_materialize(args: argparse.Namespace) -> int:
    from candgen.features.store import materialize

    end = _parse_time("end", args.end)
    print_json({"materialized_until": materialize(_store_config(args), end).isoformat()})
    return 0


def cmd_features_online(args: argparse.Namespace) -> int:
    if (args.user_id is None) == (args.ad_id is None):
        raise ConfigError("user_id", "give exactly one of --user-id or --ad-id")
    from candgen.features.store import online_features, open_store

    store = open_store(_store_config(args))
    if args.user_id is not None:
        result = online_features(store, [{"user_id": args.user_id}], args.service or USER_SERVICE)
    else:
        result = online_features(store, [{"ad_id": args.ad_id}], args.service or AD_SERVICE)
    print_json({k: v[0] for k, v in result.items()})
    return 0


def cmd_features_push(args: argparse.Namespace) -> int:
    from candgen.features.store import Engagement, open_store, push_engagements

    check_at_least("max_len", args.max_len, 1)
    event = Engagement(
        user_id=args.user_id,
        item_id=args.item_id,
        action_type=args.action_type,
        surface=args.surface,
        timestamp=_parse_time("timestamp", args.timestamp) or datetime.now(UTC),
    )
    push_engagements(open_store(_store_config(args)), [event], max_len=args.max_len)
    print_json({"pushed": dataclasses.asdict(event)})
    return 0


def cmd_features_campaign(args: argparse.Namespace) -> int:
    from candgen.data.targeting import TARGET_COLUMNS
    from candgen.features.delivery import CampaignUpdate, push_campaign_updates
    from candgen.features.store import open_store

    targeting = {c: list(getattr(args, c)) for c in TARGET_COLUMNS if getattr(args, c) is not None}
    update = CampaignUpdate(
        campaign_id=args.campaign_id,
        status=args.status,
        throttle=args.throttle,
        daily_budget=args.daily_budget,
        pacing=args.pacing,
        targeting=targeting or None,
        timestamp=_parse_time("timestamp", args.timestamp),
    )
    done = push_campaign_updates(open_store(_store_config(args)), [update])
    print_json({"pushed": {k: v for k, v in dataclasses.asdict(update).items() if v is not None},
                **done})  # fmt: skip
    return 0


def cmd_features_impression(args: argparse.Namespace) -> int:
    from candgen.features.delivery import Impression, push_impressions
    from candgen.features.store import open_store

    impression = Impression(
        user_id=args.user_id,
        ad_id=args.ad_id,
        advertiser_id=args.advertiser_id,
        timestamp=_parse_time("timestamp", args.timestamp) or datetime.now(UTC),
    )
    push_impressions(open_store(_store_config(args)), [impression])
    print_json({"pushed": dataclasses.asdict(impression)})
    return 0


def cmd_features_hide(args: argparse.Namespace) -> int:
    from candgen.features.delivery import push_hidden_advertisers
    from candgen.features.store import open_store

    push_hidden_advertisers(open_store(_store_config(args)), [(args.user_id, args.advertiser_id)])
    print_json({"hidden": {"user_id": args.user_id, "advertiser_id": args.advertiser_id}})
    return 0


def cmd_features_serve(args: argparse.Namespace) -> int:
    check_port("port", args.port)
    check_at_least("workers", args.workers, 1)
    if args.lean and args.workers != 1:
        raise ConfigError("workers", "the lean front runs one process (threads per connection)")
    what = "lean online-read front" if args.lean else "feature server"
    print(f"{what} on http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr)
    if args.lean:
        from candgen.features.online_reads import serve_online_reads

        serve_online_reads(_store_config(args), args.host, args.port)
    else:
        from candgen.features.store import serve

        serve(_store_config(args), args.host, args.port, args.workers)
    return 0


def cmd_features_training_set(args: argparse.Namespace) -> int:
    check_at_least("limit", args.limit, 0)
    from candgen.features.store import open_store
    from candgen.features.training_set import write_training_set

    store = open_store(_store_config(args))
    print_json(write_training_set(args.data, store, args.out, args.label, args.service, args.limit))
    return 0


def _add_long_term(store_cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """The long-term summariser's command: its training settings are SummariserConfig's."""
    from candgen.training.long_term import SummariserConfig

    lt = store_cmd(
        "long-term",
        "train the long-term summariser (dense all-action objective) and write its daily "
        "summaries (user_long_term_embedding)",
        cmd_features_long_term,
    )
    lt.add_argument(
        "--data", type=Path, default=DEFAULT_MARKETPLACE, help="the marketplace to train on"
    )
    lt.add_argument(
        "--model",
        type=Path,
        default=None,
        help="summarise with this trained summariser (model.pt), no training",
    )
    lt.add_argument("--nproc", type=int, default=1, help="> 1: a TorchX job (DDP) of this many")
    lt.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(lt, SummariserConfig)


def add_commands(sub: argparse._SubParsersAction[Parser]) -> None:
    from candgen.features.build import FeatureBuildConfig
    from candgen.features.store import ACTION_TYPES, StoreConfig

    feats = sub.add_parser("features", help="the Feast feature store").add_subparsers(
        dest="features_command", required=True
    )

    def store_cmd(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        sp = feats.add_parser(name, help=help_text)
        add_config_flags(sp, StoreConfig)
        sp.set_defaults(func=func)
        return sp

    build = store_cmd(
        "build", "compute the offline feature tables from a marketplace", cmd_features_build
    )
    build.add_argument(
        "--data", type=Path, default=DEFAULT_MARKETPLACE, help="the marketplace to read"
    )
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(build, FeatureBuildConfig)

    _add_long_term(store_cmd)

    store_cmd("apply", "register the feature repository (feast apply)", cmd_features_apply)

    mat = store_cmd(
        "materialize", "load features into the online store (incremental)", cmd_features_materialize
    )
    mat.add_argument(
        "--end", default=None, help="ISO time to materialise up to; default: the end of the data"
    )

    online = store_cmd("online", "look up one user's or ad's online features", cmd_features_online)
    online.add_argument("--user-id", type=int, help="the user to look up (or --ad-id)")
    online.add_argument("--ad-id", type=int, help="the ad to look up (or --user-id)")
    online.add_argument(
        "--service",
        default=None,
        help=f"the feature service to read; default: {USER_SERVICE} or {AD_SERVICE}",
    )

    push = store_cmd(
        "push", "append a real-time engagement to a user's short-term sequence", cmd_features_push
    )
    push.add_argument("--user-id", type=int, required=True, help="who engaged")
    push.add_argument("--item-id", type=int, required=True, help="the item or ad engaged with")
    push.add_argument(
        "--action-type", choices=ACTION_TYPES, default="click", help="what the user did"
    )
    push.add_argument("--surface", default="home", help="where: home, search or related")
    push.add_argument("--timestamp", default=None, help="ISO time of the event; default: now")
    push.add_argument(
        "--max-len", type=int, default=20, help="the short-term sequence keeps this many, newest"
    )

    camp = store_cmd(
        "campaign",
        "push a campaign's delivery change (pause, resume, budget, throttle, targeting) online",
        cmd_features_campaign,
    )
    camp.add_argument("--campaign-id", type=int, required=True, help="the campaign")
    camp.add_argument("--status", default=None, help="active, paused or exhausted")
    camp.add_argument("--throttle", type=float, default=None, help="share of requests, 0..1")
    camp.add_argument("--daily-budget", type=float, default=None, help="the day's budget")
    camp.add_argument("--pacing", default=None, help="even or asap")
    for column, what in (
        ("target_countries", "countries"),
        ("target_age_buckets", "age buckets"),
        ("target_devices", "devices"),
        ("target_surfaces", "surfaces"),
    ):
        camp.add_argument(
            "--" + column.replace("_", "-"),
            dest=column,
            nargs="*",
            default=None,
            help=f"the {what} it targets (none given: everyone)",
        )
    camp.add_argument("--timestamp", default=None, help="ISO time of the change; default: now")
    imp = store_cmd(
        "impression", "count an ad shown to a user today (frequency caps)", cmd_features_impression
    )
    imp.add_argument("--user-id", type=int, required=True, help="who saw it")
    imp.add_argument("--ad-id", type=int, required=True, help="the ad shown (its ad id)")
    imp.add_argument("--advertiser-id", type=int, required=True, help="the ad's advertiser")
    imp.add_argument("--timestamp", default=None, help="ISO time it was shown; default: now")
    hide = store_cmd("hide", "a user hides an advertiser", cmd_features_hide)
    hide.add_argument("--user-id", type=int, required=True, help="the user")
    hide.add_argument("--advertiser-id", type=int, required=True, help="the advertiser hidden")

    fsrv = store_cmd(
        "serve", "run the Feast feature server (HTTP) for the serving runtime", cmd_features_serve
    )
    fsrv.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    fsrv.add_argument("--port", type=int, default=6566, help="the HTTP port")
    fsrv.add_argument("--workers", type=int, default=1, help="server worker processes")
    fsrv.add_argument(
        "--lean",
        action="store_true",
        help="serve only /get-online-features and /health, Feast's read without its FastAPI "
        "stack (the serving path's features step; faster on a busy machine)",
    )

    ts = store_cmd(
        "training-set", "point-in-time training rows for a label", cmd_features_training_set
    )
    ts.add_argument(
        "--data", type=Path, default=DEFAULT_MARKETPLACE, help="the marketplace whose labels to use"
    )
    ts.add_argument(
        "--label",
        choices=["click", "conversion"],
        default="click",
        help="each impression row's label: click (it was clicked) or conversion (an attributed "
        "conversion followed its click)",
    )
    ts.add_argument(
        "--service", default="training_v1", help="the feature service joined onto each row"
    )
    ts.add_argument("--limit", type=int, default=0, help="sample this many rows (0: all)")
    ts.add_argument("--out", type=Path, required=True, help="the parquet file to write")
