"""``candgen serve`` (the local tritonserver), ``candgen serving`` (export the Triton model
repository, swap a live server onto it) and ``candgen query`` (ask the live ensemble)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from candgen.cli import Parser, add_config_flags, config_from_args, print_json
from candgen.cli.flags import check_at_least, check_positive, parse_item_ids
from candgen.errors import ConfigError

PROTOCOLS = ("http", "grpc")


def cmd_serve(args: argparse.Namespace) -> int:
    from candgen.endpoint.runtime import ServerConfig, start, status, stop

    cfg = config_from_args(ServerConfig, args)
    if args.stop:
        print_json({"stopped": stop(cfg)})
    elif args.status:
        print_json(status(cfg))
    else:
        info = start(cfg)
        print_json({k: info[k] for k in ("pid", "http", "grpc", "metrics", "models", "log")})
    return 0


def _read_shares(field_name: str, path: str) -> dict[str, Any]:
    """A ``{surface: {generator: share}}`` JSON file (the shares are checked by the config)."""
    try:
        shares = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(field_name, f"cannot read {path}: {e}") from None
    if not isinstance(shares, dict):
        raise ConfigError(field_name, "the file must hold {surface: {generator: share}}")
    return shares


def cmd_serving_export(args: argparse.Namespace) -> int:
    from candgen.endpoint.export import ExportConfig
    from candgen.index.ann import IndexConfig
    from candgen.serving.steps import ServingConfig

    files = {"weights": args.weights_file, "quota_overrides": args.quota_overrides_file}
    shares = {name: _read_shares(name, path) for name, path in files.items() if path is not None}
    serving = dataclasses.replace(config_from_args(ServingConfig, args), **shares)
    cfg = dataclasses.replace(
        config_from_args(ExportConfig, args),
        serving=serving,
        index=config_from_args(IndexConfig, args),
    )
    from candgen.endpoint.export import export

    print_json(export(cfg))
    return 0


def cmd_serving_swap(args: argparse.Namespace) -> int:
    from candgen.endpoint.client import DEFAULT_URLS
    from candgen.endpoint.export import swap

    check_positive("timeout_s", args.timeout_s)
    url = args.url or DEFAULT_URLS[args.protocol]
    print_json(swap(url, args.model_repository, args.protocol, args.timeout_s))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    check_at_least("k", args.k, 1)
    check_positive("timeout_s", args.timeout_s)
    recent = parse_item_ids("recent", args.recent)
    from candgen.endpoint.client import RetrieveClient

    client = RetrieveClient(args.url, args.protocol, timeout_s=args.timeout_s)
    res = client.retrieve(
        args.user_id, args.scenario, args.k, recent, args.query, args.context_item_id
    )
    if args.json:
        print_json(dataclasses.asdict(res))
        return 0
    marks = f"  [{', '.join(res.flags)}]" if res.flags else ""
    context = f" for {args.query!r}" if args.query is not None else ""
    if args.context_item_id is not None:
        context += f" beside item {args.context_item_id}"
    print(
        f"user {args.user_id} on {args.scenario}{context}: {len(res.ad_ids)} ads via "
        f"{client.protocol}://{client.url}{marks}"
    )
    counts = ", ".join(f"{s} {n}" for s, n in res.source_counts.items())
    print(f"  by generator ({res.quota_policy} quotas): {counts}")
    print(f"  {'rank':>4}  {'ad_id':>12}  {'score':>8}  source")
    rows = zip(res.ad_ids, res.scores, res.sources, strict=True)
    for rank, (ad, score, source) in enumerate(rows, 1):
        print(f"  {rank:>4}  {ad:>12}  {score:>8.4f}  {source}")
    return 0


def add_commands(sub: argparse._SubParsersAction[Parser]) -> None:
    from candgen.endpoint.export import ExportConfig
    from candgen.endpoint.runtime import ServerConfig
    from candgen.index.ann import IndexConfig
    from candgen.serving.steps import ServingConfig

    serve = sub.add_parser("serve", help="start (or --stop) the local tritonserver")
    serve.add_argument("--stop", action="store_true", help="stop the running server")
    serve.add_argument("--status", action="store_true", help="print whether it runs")
    add_config_flags(serve, ServerConfig)
    serve.set_defaults(func=cmd_serve)

    srv = sub.add_parser("serving", help="the Triton model repository").add_subparsers(
        dest="serving_command", required=True
    )
    ex = srv.add_parser("export", help="export a registered version as the retrieve ensemble")
    add_config_flags(ex, ExportConfig, exclude=("serving", "index"))
    add_config_flags(ex, ServingConfig, exclude=("weights", "quota_overrides"))
    ex.add_argument(
        "--weights",
        dest="weights_file",
        default=None,
        help="JSON file: surface -> generator -> share of the fixed policy (default: built in)",
    )
    ex.add_argument(
        "--quota-overrides",
        dest="quota_overrides_file",
        default=None,
        help="JSON file: surface -> generator -> share, used for that surface whatever the policy",
    )
    add_config_flags(ex, IndexConfig)
    ex.set_defaults(func=cmd_serving_export)

    sw = srv.add_parser("swap", help="load the repository's pinned version into a live server")
    sw.add_argument(
        "--model-repository",
        type=Path,
        default=Path("data/model_repository"),
        help="the exported repository whose pinned version to load",
    )
    sw.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="grpc",
        help="how to ask for the loads (gRPC: a load asked over HTTP stalls HTTP requests)",
    )
    sw.add_argument(
        "--url",
        default="",
        help="the server, host:port; default: 127.0.0.1:8001 (grpc), :8000 (http)",
    )
    sw.add_argument(
        "--timeout-s", type=float, default=600.0, help="how long the load may take (seconds)"
    )
    sw.set_defaults(func=cmd_serving_swap)


def add_query_command(sub: argparse._SubParsersAction[Parser]) -> None:
    q = sub.add_parser("query", help="ask the live retrieve ensemble for a user's candidates")
    q.add_argument("user_id", type=int, help="the user to retrieve ads for")
    q.add_argument(
        "--scenario", default="home", help="the request's surface: home, search or related"
    )
    q.add_argument("-k", "--k", type=int, default=100, help="how many ads to ask for")
    q.add_argument(
        "--recent",
        default="",
        help="item ids engaged with in this session, comma-separated, newest last",
    )
    q.add_argument("--query", default=None, help="the search query (read on the search surface)")
    q.add_argument(
        "--context-item-id",
        type=int,
        default=None,
        help="the item the related-items page shows (read on the related surface)",
    )
    q.add_argument("--protocol", choices=PROTOCOLS, default="http", help="the server's protocol")
    q.add_argument(
        "--url",
        default="",
        help="the server, host:port; default: 127.0.0.1:8000 (http), :8001 (grpc)",
    )
    q.add_argument("--timeout-s", type=float, default=10.0, help="per request, seconds")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.set_defaults(func=cmd_query)
