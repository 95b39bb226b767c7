"""``candgen quotas``: learn the quotas across candidate generators from logged outcomes, compare
them with the fixed policies, show what a table or an exported repository serves."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from candgen.cli import DEFAULT_MARKETPLACE, Parser, add_config_flags, config_from_args, print_json
from candgen.cli.flags import check_at_least
from candgen.errors import ConfigError

DEFAULT_FEATURES = Path("feature_repo/data/features")


def cmd_quotas_learn(args: argparse.Namespace) -> int:
    from candgen.quotas.learning import QuotaLearnConfig, learn_quotas

    config = config_from_args(QuotaLearnConfig, args)
    learned = learn_quotas(
        args.model,
        args.data,
        args.features_dir,
        config,
        args.index_dir,
        progress=not args.quiet,
        generative_path=args.generative,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    learned.save(Path(args.out))
    print_json({"out": str(args.out), "activity_edges": learned.activity_edges, **learned.fitted})
    return 0


def cmd_quotas_compare(args: argparse.Namespace) -> int:
    from candgen.quotas.learning import (
        QuotaLearnConfig,
        compare_policies,
        fit,
        fixed_grid,
        replay_window,
    )
    from candgen.serving.quota import DEFAULT_WEIGHTS, QuotaPolicy, describe

    ks = sorted(set(args.k))
    check_at_least("k", ks[0], 1)
    fixed_grid(args.fixed_step)  # a bad step is an error before the replays
    config = config_from_args(QuotaLearnConfig, args)
    if config.max_rank < ks[-1]:
        raise ConfigError("max_rank", f"must be >= the largest K ({ks[-1]}), got {config.max_rank}")
    replays = {
        w: replay_window(
            args.model,
            args.data,
            args.features_dir,
            config,
            w,
            args.index_dir,
            progress=not args.quiet,
            generative_path=args.generative,
        )
        for w in ("valid", "test")
    }
    learned = fit(replays["valid"], config)
    result = {
        "fit_requests": len(replays["valid"]),
        "test_requests": len(replays["test"]),
        "activity_edges": learned.activity_edges,
        "prior_strength": learned.fitted["prior_strength"],
        "policies": compare_policies(
            replays["valid"], replays["test"], learned, ks, DEFAULT_WEIGHTS, args.fixed_step
        ),
        # What the learned table gives each generator, per context, at each K.
        "learned_slots": {
            str(k): [
                {key: row[key] for key in ("surface", "activity", "slots")}
                for row in describe(QuotaPolicy("learned", learned=learned), k)
            ]
            for k in ks
        },
    }
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    print_json(result)
    return 0


def cmd_quotas_show(args: argparse.Namespace) -> int:
    from candgen.serving.quota import LearnedQuotas, QuotaPolicy, describe

    if (args.table is None) == (args.model_repository is None):
        raise ConfigError("table", "give a learned table or --model-repository, not both")
    check_at_least("k", args.k, 1)
    if args.model_repository is not None:
        from candgen.serving.steps import SelectStep, pinned_version, read_serving_file

        version = pinned_version(args.model_repository)
        folder = args.model_repository / SelectStep.MODEL / str(version)
        policy = read_serving_file(folder)[0].policy(folder)
    else:
        policy = QuotaPolicy("learned", learned=LearnedQuotas.load(args.table))
    rows = describe(policy, args.k)
    if args.json:
        print_json(rows)
        return 0
    print(f"quota policy {policy.policy}; slots of K={args.k} per context")
    for row in rows:
        slots = ", ".join(f"{g} {n}" for g, n in row["slots"].items())
        print(f"  {row['surface']:<8} {row['activity']:<8} {row['source']:<9} {slots}")
    return 0


def _add_replay_inputs(sp: argparse.ArgumentParser) -> None:
    """What learn and compare replay: the model, its marketplace, features and index."""
    sp.add_argument("--model", type=Path, required=True, help="the trained model.pt")
    sp.add_argument(
        "--data", type=Path, default=DEFAULT_MARKETPLACE, help="the marketplace the model saw"
    )
    sp.add_argument(
        "--features-dir",
        type=Path,
        default=DEFAULT_FEATURES,
        help="the offline feature tables (candgen features build)",
    )
    sp.add_argument(
        "--index-dir",
        type=Path,
        default=None,
        help="the model's index (candgen index build); default: exact search",
    )
    sp.add_argument(
        "--generative",
        type=Path,
        default=None,
        help="a generative model.pt of the same marketplace: its ads join the generators",
    )


def add_commands(sub: argparse._SubParsersAction[Parser]) -> None:
    from candgen.quotas.learning import FIXED_STEP, QuotaLearnConfig

    quotas = sub.add_parser("quotas", help="the quotas across candidate generators").add_subparsers(
        dest="quotas_command", required=True
    )
    ql = quotas.add_parser(
        "learn",
        help="fit each generator's value per slot from the logged outcomes of the model's "
        "validation window",
    )
    _add_replay_inputs(ql)
    ql.add_argument(
        "--out", type=Path, default=Path("data/quotas.json"), help="the learned table (JSON)"
    )
    ql.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(ql, QuotaLearnConfig)
    ql.set_defaults(func=cmd_quotas_learn)

    qc = quotas.add_parser(
        "compare",
        help="learned quotas vs the best fixed split (overall and per context), snake merge and "
        "the hand-set weights over the five generators: recall by label on the model's test "
        "window, fitted on its validation window, each request replayed with its query or "
        "context item",
    )
    _add_replay_inputs(qc)
    qc.add_argument(
        "-k", "--k", type=int, nargs="+", default=[50, 100, 200], help="the K of each comparison"
    )
    qc.add_argument(
        "--fixed-step",
        type=float,
        default=FIXED_STEP,
        help="the fixed splits' grid step: every split of the slots among the five generators "
        "in multiples of it (0.2: 126 splits; 0.1: 1,001, about eight times slower)",
    )
    qc.add_argument("--out", type=Path, default=None, help="also write the result here (JSON)")
    qc.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(qc, QuotaLearnConfig)
    qc.set_defaults(func=cmd_quotas_compare)

    qs = quotas.add_parser("show", help="print the slots each generator gets per context")
    qs.add_argument(
        "table", type=Path, nargs="?", default=None, help="a learned table (candgen quotas learn)"
    )
    qs.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        help="the policy an exported repository serves (its pinned version)",
    )
    qs.add_argument("-k", "--k", type=int, default=100, help="the K whose slots to show")
    qs.add_argument("--json", action="store_true", help="print the rows as JSON")
    qs.set_defaults(func=cmd_quotas_show)
