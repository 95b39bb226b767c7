"""``candgen index build``: the FAISS serving index of a registered version; ``candgen
semantic-ids``: the semantic ID table a generative model trains on."""

from __future__ import annotations

import argparse
from pathlib import Path

from candgen.cli import Parser, add_config_flags, config_from_args, print_json
from candgen.cli.flags import check_at_least, check_not_empty
from candgen.cli.registry import TRACKING_HELP


def cmd_index_build(args: argparse.Namespace) -> int:
    from candgen.index.ann import IndexConfig

    check_not_empty("model_uri", args.model_uri)
    check_at_least("recall_k", args.recall_k, 1)
    cfg = config_from_args(IndexConfig, args)
    from candgen.index.build import build_index

    summary = build_index(
        args.model_uri,
        args.out,
        cfg,
        ads_only=not args.all_items,
        recall_k=args.recall_k,
        tracking_uri=args.tracking_uri,
        progress=True,
    )
    print_json(summary)
    return 0


def cmd_semantic_ids(args: argparse.Namespace) -> int:
    from candgen.models.semantic_ids import SemanticIdConfig

    check_not_empty("model", str(args.model))
    cfg = config_from_args(SemanticIdConfig, args)
    from candgen.index.semantic import build_semantic_ids

    print_json(build_semantic_ids(args.model, args.out, cfg))
    return 0


def add_commands(sub: argparse._SubParsersAction[Parser]) -> None:
    from candgen.index.ann import IndexConfig

    idx = sub.add_parser("index", help="the FAISS serving index").add_subparsers(
        dest="index_command", required=True
    )
    ib = idx.add_parser("build", help="index a registered version's ad embeddings, log recall")
    ib.add_argument(
        "--model-uri", required=True, help="the registered version, e.g. models:/ads-hstu@champion"
    )
    ib.add_argument(
        "--out", type=Path, default=Path("data/index"), help="the folder the index goes to"
    )
    ib.add_argument("--all-items", action="store_true", help="index every item, not only ads")
    ib.add_argument(
        "--recall-k",
        type=int,
        default=100,
        help="K of the index's recall@K against exact search, logged to the registry",
    )
    ib.add_argument("--tracking-uri", default="", help=TRACKING_HELP)
    add_config_flags(ib, IndexConfig)
    ib.set_defaults(func=cmd_index_build)

    from candgen.models.semantic_ids import SemanticIdConfig

    sid = sub.add_parser(
        "semantic-ids",
        help="give every item of a trained model a semantic ID (for --model generative)",
    )
    sid.add_argument("--model", type=Path, required=True, help="a model.pt of the data set")
    sid.add_argument(
        "--out", type=Path, default=Path("data/semantic_ids.npz"), help="the ID table file"
    )
    add_config_flags(sid, SemanticIdConfig)
    sid.set_defaults(func=cmd_semantic_ids)
