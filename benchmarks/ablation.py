"""Ads-retrieval ablation on the synthetic marketplace, held-out days (issue 6).

Generates one marketplace (its features with MiniLM ad text embeddings and the long-term
summaries), then trains each variant as its own `candgen train` command (a 2-process TorchX job)
and reports recall@50/100/200 per label (organic engagement, ad click, attributed conversion)
and per surface, and on cold-start ads, on the last ``--eval-days`` days; then compares the quota
policies over the unified model's generators (`candgen quotas compare`). Every row comes from
one command, printed beside it. Results are stored in docs/benchmarks/ablation_<machine>.json and
rendered into docs/BENCHMARKS.md.

    python benchmarks/ablation.py                  # data + every variant (about 20 min, 2 cores)
    python benchmarks/ablation.py --render-only    # rewrite the doc from the stored results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench_doc import write_headline, write_section  # noqa: E402

from candgen.quotas.learning import COMPARED_POLICIES  # noqa: E402

RESULTS = ROOT / "docs" / "benchmarks"
CANDGEN = [sys.executable, "-m", "candgen.cli"]
LABELS = ("organic", "click", "conversion")
SURFACES = ("home", "search", "related")
KS = (50, 100, 200)

# (row name, `candgen train` arguments that make the variant)
VARIANTS: list[tuple[str, list[str]]] = [
    ("HSTU, every label as one task", ["--model", "hstu"]),
    ("HSTU, organic only", ["--model", "hstu", "--train-labels", "organic"]),
    ("HSTU, ad clicks only", ["--model", "hstu", "--train-labels", "click", "conversion"]),
    ("HSTU, conversions only", ["--model", "hstu", "--train-labels", "conversion"]),
    (
        "two-tower, ad clicks only",
        ["--model", "two_tower", "--train-labels", "click", "conversion"],
    ),
    ("unified", ["--model", "unified"]),
    # Its semantic IDs come from the unified model's item table (``IDS``, built after that row):
    # behaviour for trained items, text for cold ads. A beam of 200 answers recall@200. The
    # unified transducer and the dense head were chosen on the validation window's union recall
    # (ablation_notes.md: an HSTU transducer, context-free, took recall from the union).
    (
        "generative, semantic IDs",
        [
            "--model",
            "generative",
            "--backbone",
            "unified",
            "--dense-weight",
            "1",
            "--beam-width",
            "200",
            "--semantic-ids",
        ],
    ),
    ("unified, no scenario adaptation", ["--model", "unified", "--no-scenario-adaptive"]),
    ("unified, no context", ["--model", "unified", "--no-context"]),
    ("unified, no long-term summary", ["--model", "unified", "--no-long-term"]),
    ("unified, no short-term sequence", ["--model", "unified", "--no-short-term"]),
]
UNIFIED = "unified"
GENERATIVE = "generative, semantic IDs"
IDS = "semantic-ids.npz"  # in the runs folder
POPULARITY = "popularity"
UNION_K = 200  # the budget at which the generative list joins the unified one
GENERATIVE_SOURCE = "generative"  # the generator's name in the quotas
# The paired comparison of the unified model with itself ranked without the request's context.
WITHOUT_CONTEXT = "unified, ranked without its context"


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _printed(cmd: list[str]) -> tuple[dict, float]:
    """Runs a command that prints JSON: what it printed, and its wall seconds."""
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(done.stdout), round(time.perf_counter() - t0, 1)


def _command_text(cmd: list[str]) -> str:
    return " ".join(["candgen", *cmd[3:]])


def _slug(name: str) -> str:
    return name.lower().replace(", ", "-").replace(" ", "-")


def run(args: argparse.Namespace) -> dict:
    work = Path(args.workdir)  # relative to the repository, where every command runs
    market, features = work / "marketplace", work / "features"
    synth = [
        *CANDGEN,
        "data",
        "synth",
        "--out",
        str(market),
        "--overwrite",
        "--quiet",
        "--users",
        str(args.users),
        "--ads",
        str(args.ads),
        "--days",
        str(args.days),
        "--impressions-per-session",
        str(args.impressions_per_session),
        "--seed",
        str(args.seed),
    ]
    build = [
        *CANDGEN,
        "features",
        "build",
        "--data",
        str(market),
        "--features-dir",
        str(features),
        "--quiet",
    ]
    long_term = [
        *CANDGEN,
        "features",
        "long-term",
        "--data",
        str(market),
        "--features-dir",
        str(features),
        "--eval-days",
        str(args.eval_days),
        "--nproc",
        str(args.nproc),
        "--seed",
        str(args.seed),
        "--out-dir",
        str(work / "runs" / "long-term"),
        "--quiet",
    ]
    store = RESULTS / f"ablation_{args.machine}.json"
    before = json.loads(store.read_text()) if args.resume and store.exists() else {}
    t0 = time.perf_counter()
    summarised = (features / "manifest.json").exists() and "long_term" in json.loads(
        (features / "manifest.json").read_text()
    )
    if not (args.resume and summarised):
        _run(synth)
        _run(build)
        _run(long_term)
    setup_seconds = round(time.perf_counter() - t0, 1)
    if args.resume and summarised:  # reused: the stored time, if the earlier run stored one
        setup_seconds = before.get("data", {}).get("setup_seconds")
    rows = []
    semantic_ids: dict = {}
    for name, extra in VARIANTS:
        out = work / "runs" / _slug(name)
        if name == GENERATIVE:
            ids = work / "runs" / IDS
            semantic_ids = _semantic_ids(work, ids, args.resume)
            extra = [*extra, str(ids)]
        cmd = [
            *CANDGEN,
            "train",
            "--nproc",
            str(args.nproc),
            "--dataset",
            "marketplace",
            "--data-dir",
            str(market),
            "--features-dir",
            str(features),
            "--epochs",
            str(args.epochs),
            "--lr",
            "3e-3",
            "--eval-days",
            str(args.eval_days),
            "--batch-size",
            "128",
            "--seed",
            str(args.seed),
            "--no-track",
            "--no-progress",
            "--out-dir",
            str(out),
            *extra,
        ]
        t0 = time.perf_counter()
        metrics = out / "metrics.json"
        reused = args.resume and metrics.exists()
        if reused:
            print(f"{name}: reusing {metrics} (--resume)", flush=True)
            seconds = json.loads(metrics.read_text()).get("wall_seconds", 0.0)
        else:
            _run(cmd)
            seconds = time.perf_counter() - t0
        trained = json.loads(metrics.read_text())
        test = trained["test"]
        rows.append(
            {
                "name": name,
                "command": _command_text(cmd),
                "seconds": round(seconds, 1),
                "peak_memory_mb": round(trained["peak_memory_mb"]),
                "reused": reused,
                "test": test,
            }
        )
        said = [f"{lab} recall@100 {_value(test, f'label.{lab}.recall@100')}" for lab in LABELS]
        print(f"{name}: " + ", ".join(said), flush=True)
    rows.append(_popularity_row(work))
    paired = _paired_comparisons(rows, work)
    union = _union(work)
    quota_out = work / "quotas_compare.json"
    quotas = [
        *CANDGEN,
        "quotas",
        "compare",
        "--model",
        str(work / "runs" / _slug(UNIFIED) / "model.pt"),
        "--data",
        str(market),
        "--features-dir",
        str(features),
        "--eval-days",
        str(args.eval_days),
        "-k",
        *map(str, KS),
        "--max-rank",
        str(max(KS)),
        "--generative",
        str(work / "runs" / _slug(GENERATIVE) / "model.pt"),
        "--out",
        str(quota_out),
        "--quiet",
    ]
    t0 = time.perf_counter()
    subprocess.run(quotas, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    quota_result = json.loads(quota_out.read_text())
    return {
        "machine": args.machine,
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "data": {
            "users": args.users,
            "ads": args.ads,
            "days": args.days,
            "eval_days": args.eval_days,
            "seed": args.seed,
            "impressions_per_session": args.impressions_per_session,
            "command": _command_text(synth),
            "features": _command_text(build),
            "long_term": _command_text(long_term),
            "setup_seconds": setup_seconds,
        },
        "epochs": args.epochs,
        "nproc": args.nproc,
        "rows": rows,
        "paired": paired,
        "semantic_ids": semantic_ids,
        "union": union,
        "quotas": {
            "command": _command_text(quotas),
            "seconds": round(time.perf_counter() - t0, 1),
            **quota_result,
        },
    }


# (what the comparison asks, the row compared with the unified model); the best single-task
# model of each label is added at run time.
ABLATED = (
    ("scenario adaptation", "unified, no scenario adaptation"),
    ("the short-term sequence", "unified, no short-term sequence"),
    ("the long-term summary", "unified, no long-term summary"),
    ("the context modules (query tower, context item)", "unified, no context"),
)


def _semantic_ids(work: Path, out: Path, resume: bool) -> dict:
    """The unified model's items' semantic IDs (what the generative row trains on)."""
    cmd = [
        *CANDGEN,
        "semantic-ids",
        "--model",
        str(work / "runs" / _slug(UNIFIED) / "model.pt"),
        "--out",
        str(out),
    ]
    summary_file = out.with_suffix(".json")
    if resume and summary_file.exists():
        return json.loads(summary_file.read_text())
    printed, seconds = _printed(cmd)
    summary = {"command": _command_text(cmd), "seconds": seconds, **printed}
    summary_file.write_text(json.dumps(summary, indent=2))
    return summary


def _paired_command(work: Path, how: str, other: str, k: int) -> list[str]:
    """`candgen evaluate` of the unified model paired with the ``other`` row's (``how``:
    --against or --union) on the test window at ``k``."""
    return [
        *CANDGEN,
        "evaluate",
        "--model",
        str(work / "runs" / _slug(UNIFIED) / "model.pt"),
        how,
        str(work / "runs" / _slug(other) / "model.pt"),
        "--split",
        "test",
        "-k",
        str(k),
    ]


def _union(work: Path) -> dict:
    """The unified model's top 200 against its top 200 - S joined with the generative model's
    top S (S chosen on the validation window), paired per user on the test window."""
    cmd = _paired_command(work, "--union", GENERATIVE, UNION_K)
    printed, seconds = _printed(cmd)
    return {"command": _command_text(cmd), "seconds": seconds, "result": printed}


def _popularity_row(work: Path) -> dict:
    """The trivial baseline on the same test window: every user gets the items most popular in
    training (`candgen evaluate` prints it beside the model)."""
    cmd = [
        *CANDGEN,
        "evaluate",
        "--model",
        str(work / "runs" / _slug(UNIFIED) / "model.pt"),
        "--split",
        "test",
    ]
    out, seconds = _printed(cmd)
    return {
        "name": POPULARITY,
        "command": _command_text(cmd) + "  (its popularity block)",
        "seconds": seconds,
        "reused": False,
        "test": out["popularity"],
    }


_NOT_SINGLE = (POPULARITY, GENERATIVE)  # not the single-task models the unified one must beat


def _best_single_task(rows: list[dict], label: str) -> str:
    singles = [
        r for r in rows if r["name"] not in _NOT_SINGLE and not r["name"].startswith("unified")
    ]
    key = f"label.{label}.recall@100"
    return max(singles, key=lambda r: r["test"].get(key, 0.0))["name"]


def _paired_comparisons(rows: list[dict], work: Path) -> list[dict]:
    """The unified model against the best single-task model of each label and against each
    ablated variant, per user on the test window (`candgen evaluate --against`)."""
    pairs = [
        (f"the best single-task model on {lab}", _best_single_task(rows, lab)) for lab in LABELS
    ]
    pairs += list(ABLATED)
    pairs.append(("the request's context (query, context item)", WITHOUT_CONTEXT))
    out, done = [], {}
    for question, other in pairs:
        if other not in done:
            # Without its context: the same file as baseline, ranked by --no-context.
            against = UNIFIED if other == WITHOUT_CONTEXT else other
            cmd = _paired_command(work, "--against", against, 100)
            cmd += ["--no-context"] if other == WITHOUT_CONTEXT else []
            done[other] = (cmd, _printed(cmd)[0])
        cmd, result = done[other]
        out.append(
            {
                "question": question,
                "against": other,
                "command": _command_text(cmd),
                "result": result,
            }
        )
    return out


def _value(test: dict, key: str) -> str:
    return f"{test[key]:.4f}" if key in test else "n/a"


def render(result: dict) -> str:
    rows = result["rows"]
    d = result["data"]
    first = rows[0]["test"]
    users = ", ".join(f"{lab} {int(first.get(f'label.{lab}.users', 0))}" for lab in LABELS)
    cold_users = int(first.get("ads.cold.users", 0))
    lines = [
        "## Ads retrieval ablation (issue 6)",
        "",
        f"Synthetic marketplace: {d['users']:,} users, {d['ads']:,} ads, {d['days']} days, "
        f"{d['impressions_per_session']} ad impressions per session (`{d['command']}`), ad text "
        f"embedded by all-MiniLM-L6-v2 (`{d['features']}`), long-term summaries by a "
        f"dense all-action summariser (`{d['long_term']}`; data, features and summaries "
        + (
            f"took {d['setup_seconds']} s"
            if d.get("setup_seconds") is not None
            else "were reused from an interrupted run"
        )
        + f"). The last {d['eval_days']} days are the test window, ranked "
        f"from each user's history before it (full ranking over every item and ad, history "
        f"excluded; the days before are the validation window, and no model or summariser "
        f"trained on either). Users with targets: {users}; {cold_users} users clicked a "
        f"cold-start ad (one with no training interaction). Each model row is one "
        f"`candgen train` command ({result['nproc']} TorchX processes, {result['epochs']} "
        f"epochs, machine `{result['machine']}`: {result['cpus']} CPUs, Python "
        f"{result['python']}); one run each, so small differences are noise.",
        "",
        "Recall@K per label:",
        "",
        "| variant | " + " | ".join(f"{lab} R@{k}" for lab in LABELS for k in KS) + " |",
        "|---|" + "---|" * (len(LABELS) * len(KS)),
    ]
    for row in rows:
        t = row["test"]
        cells = [_value(t, f"label.{lab}.recall@{k}") for lab in LABELS for k in KS]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Recall@K per surface (seconds: the wall time of the row's command; for a row "
        "reused by `--resume`, the trainer's own; peak memory: the peak RSS of one training "
        "process, rank 0 of the row's processes, as the trainer measures it):",
        "",
        "| variant | "
        + " | ".join(f"{s} R@{k}" for s in SURFACES for k in KS)
        + " | seconds | peak memory |",
        "|---|" + "---|" * (len(SURFACES) * len(KS) + 2),
    ]
    for row in rows:
        t = row["test"]
        cells = [_value(t, f"surface.{s}.recall@{k}") for s in SURFACES for k in KS]
        peak = row.get("peak_memory_mb")
        memory = f"{peak:,} MB" if peak is not None else "not measured"
        lines.append(
            f"| {row['name']} | " + " | ".join(cells) + f" | {row['seconds']} | {memory} |"
        )
    lines += [
        "",
        "Cold-start ads (no training interaction) against warm ads, ad targets only:",
        "",
        "| variant | cold R@50 | cold R@100 | cold R@200 | warm R@100 | cold / warm at 100 |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        t = row["test"]
        cold, warm = t.get("ads.cold.recall@100", 0.0), t.get("ads.warm.recall@100", 0.0)
        ratio = f"{cold / warm:.2f}" if warm else "n/a"
        cells = [_value(t, f"ads.cold.recall@{k}") for k in KS]
        lines.append(
            f"| {row['name']} | "
            + " | ".join(cells)
            + f" | {_value(t, 'ads.warm.recall@100')} | {ratio} |"
        )
    lines += _paired_table(result.get("paired", []))
    lines += _union_table(result)
    lines += _quota_table(result.get("quotas"))
    lines += ["", "Commands:", ""]
    lines += [f"- {row['name']}: `{row['command']}`" for row in rows]
    if result.get("quotas"):
        lines.append(f"- quota policies: `{result['quotas']['command']}`")
    lines += [
        f"- unified vs {p['against']}: `{p['command']}`" for p in _unique(result.get("paired", []))
    ]
    if result.get("semantic_ids"):
        lines.append(f"- semantic IDs: `{result['semantic_ids']['command']}`")
    if result.get("union"):
        lines.append(f"- unified joined with the generative model: `{result['union']['command']}`")
    lines += ["", *_targets(rows, result.get("quotas"), result.get("paired", []))]
    union_figures = generative_figures(result)
    if union_figures:
        lines += ["", "Targets (issue 18, generative retrieval):", ""]
        lines += [
            f"- {f['how']}: {f['value']} vs target {f['target']}: "
            + ("met" if f["met"] else "missed")
            for f in union_figures.values()
        ]
    figures = context_figures(result)
    lines += ["", "Targets (issue 14, surface context):", ""]
    lines += [
        f"- {f['how']}: {f['value']} vs target {f['target']}: " + ("met" if f["met"] else "missed")
        for f in figures.values()
    ]
    # What was measured beside the table (experiments, their commands and what they showed).
    extra = RESULTS / "ablation_notes.md"
    if extra.exists():
        lines += ["", extra.read_text().strip()]
    return "\n".join(lines)


def _paired_table(paired: list[dict]) -> list[str]:
    if not paired:
        return []
    lines = [
        "",
        "The unified model minus another, recall@100 per user on the same test targets "
        "(paired; 95% bootstrap interval; users where the unified model ranks more / "
        "fewer of their targets in its top 100):",
        "",
        "| unified vs | organic | click | conversion |",
        "|---|---|---|---|",
    ]
    for p in _unique(paired):
        cells = [_paired(p["result"].get(f"label.{lab}")) for lab in LABELS]
        lines.append(f"| {p['against']} | " + " | ".join(cells) + " |")
    return lines


UNION_GROUPS = (
    ("all", "every target"),
    ("label.organic", "organic"),
    ("label.click", "ad click"),
    ("label.conversion", "conversion"),
    ("surface.home", "home"),
    ("surface.search", "search"),
    ("surface.related", "related"),
    ("ads.cold", "cold-start ads"),
    ("ads.warm", "warm ads"),
)


def _union_table(result: dict) -> list[str]:
    union = result.get("union")
    if not union:
        return []
    u, ids = union["result"], result.get("semantic_ids", {})
    k, share = u["k"], u["share"]
    chosen = ", ".join(f"S={s}: {v:.4f}" for s, v in u["valid_recall_by_share"].items())
    lines = [
        "",
        f"Generative retrieval joined with the unified model (issue 18), at the same budget: "
        f"recall@{k} of the unified model's top {k - share} plus the generative model's first "
        f"{share} items not already among them (as the quotas share slots) minus the unified "
        f"model's top {k} alone, paired per user on the test window. S "
        f"was chosen on the validation window (union recall@{k} there: {chosen}). The IDs: "
        f"residual k-means over the unified model's item table (behaviour where trained, "
        f"the ad's text where cold), {ids.get('levels', '?')} levels of "
        f"{ids.get('codebook_size', '?')} codes and a collision token; distinct prefixes "
        f"per level {ids.get('distinct_prefixes', '?')}, residual variance share "
        f"{ids.get('residual_variance_share', '?')}.",
        "",
        f"| targets | unified R@{k} | joined R@{k} | joined minus unified (95% interval; users "
        "won / lost of n) |",
        "|---|---|---|---|",
    ]
    for key, name in UNION_GROUPS:
        d = u.get(key)
        if d:
            lines.append(f"| {name} | {d['baseline']:.4f} | {d['model']:.4f} | {_paired(d)} |")
    return lines


def generative_figures(result: dict) -> dict[str, dict]:
    """The issue-18 figure of an ablation run: what the generative list adds to the unified
    model's candidates (what docs/benchmarks/headline.json gets)."""
    union = result.get("union")
    if not union:
        return {}
    u = union["result"]
    d, cold = u["all"], u.get("ads.cold")
    on_cold = (
        f"; on cold-start ads {cold['baseline']:.4f} -> {cold['model']:.4f}{_noise(cold)}"
        if cold
        else ""
    )
    return {
        "ablation.generative_union_recall200_gain": {
            "value": round(d["mean"], 4),
            "target": "> 0 and beyond noise",
            "met": bool(d["mean"] > 0 and _beyond_noise(d)),
            "how": f"recall@{u['k']} of the unified model's top {u['k'] - u['share']} joined "
            f"with the generative model's top {u['share']} ({d['model']:.4f}) minus the "
            f"unified model's top {u['k']} ({d['baseline']:.4f}){_noise(d)}{on_cold} "
            f"(`{union['command']}`, the marketplace ablation)",
        }
    }


def _quota_table(quotas: dict | None) -> list[str]:
    if not quotas:
        return []
    policies = quotas["policies"]
    strength = quotas.get("prior_strength")
    generators = list(strength) if isinstance(strength, dict) else ["sequential", "content"]
    # Three surfaces x the activity buckets (edges + 1) are the contexts the values are fitted in.
    contexts = 3 * (len(quotas["activity_edges"]) + 1)
    lines = [
        "",
        f"Quota policies over the unified model's generators ({', '.join(generators)}), at "
        f"equal K: the test window's {quotas['test_requests']:,} requests (a user's ad clicks "
        f"on one surface under one context: a search query, a related page's item, or none "
        f"on home) that led to ad clicks, each replayed with its own context through the "
        f"generators as they stood when the window began; the learned values were fitted "
        f"on the validation window's {quotas['fit_requests']:,} requests (activity buckets "
        f"at {quotas['activity_edges']} lifetime actions). Recall per request:",
        "",
        "| policy | "
        + " | ".join(f"{lab} R@{k}" for lab in ("click", "conversion") for k in KS)
        + " |",
        "|---|" + "---|" * (2 * len(KS)),
    ]
    for name in COMPARED_POLICIES:
        if name not in policies:
            continue
        m = policies[name]
        cells = [_value(m, f"{lab}.recall@{k}") for lab in ("click", "conversion") for k in KS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    splits = policies["best fixed"]
    said = "; ".join(
        f"K={k}: " + ", ".join(f"{g} {w:.1f}" for g, w in splits[f"split@{k}"].items()) for k in KS
    )
    n_conv = int(policies["learned"].get("conversion.requests", 0))
    pooled = (
        " The learned values were pooled across contexts with an estimated strength of "
        + ", ".join(f"{g} {v:,.0f}" for g, v in strength.items())
        + " requests (empirical Bayes; a context holds "
        f"{quotas['fit_requests'] / contexts:,.0f} requests on average)."
        if isinstance(strength, dict)
        else ""
    )
    slots = quotas.get("learned_slots", {})
    if isinstance(strength, dict) and GENERATIVE_SOURCE in strength:
        for k in (str(k) for k in KS if str(k) in slots):
            by_surface = {}
            for row in slots[k]:
                by_surface.setdefault(row["surface"], []).append(row["slots"][GENERATIVE_SOURCE])
            ranges = ", ".join(
                f"{surface} {min(v)}-{max(v)}" if min(v) != max(v) else f"{surface} {v[0]}"
                for surface, v in by_surface.items()
            )
            lines += [
                "",
                f"The generative generator's slots of K={k} in the learned table, per surface "
                f"across the activity buckets (before a request's missing generators hand "
                f"theirs on): {ranges}.",
            ]
    lines += [
        "",
        f"The best fixed split (chosen per K by conversion recall on the validation "
        f"window): {said}. {n_conv} test requests hold a conversion.{pooled}",
        "",
        "Learned minus best fixed, per request (paired; 95% bootstrap interval; requests "
        "where the learned quotas found more / fewer of the clicked ads):",
        "",
        "| K | click | conversion |",
        "|---|---|---|",
    ]
    for k in KS:
        cells = [
            _paired(policies["learned"].get(f"{lab}.vs_best_fixed@{k}"))
            for lab in ("click", "conversion")
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def _unique(paired: list[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for p in paired:
        seen.setdefault(p["against"], p)
    return list(seen.values())


def _beyond_noise(d: dict) -> bool:
    """A paired difference whose 95% interval excludes zero."""
    return d["low"] > 0 or d["high"] < 0


def _noise(d: dict | None) -> str:
    """What a paired difference's interval says."""
    if not d:
        return ""
    clear = _beyond_noise(d)
    return f" (paired {d['mean']:+.4f}, 95% interval {d['low']:+.4f} to {d['high']:+.4f}: " + (
        "beyond noise)" if clear else "within noise)"
    )


def _clear(d: dict | None) -> str:
    """A mark for a paired difference whose interval excludes zero."""
    return " (beyond noise)" if d and _beyond_noise(d) else ""


def _paired(d: dict | None) -> str:
    if not d:
        return "n/a"
    return (
        f"{d['mean']:+.4f} ({d['low']:+.4f} to {d['high']:+.4f}; {d['wins']} / "
        f"{d['losses']} of {d['n']})"
    )


def _targets(rows: list[dict], quotas: dict | None, paired: list[dict]) -> list[str]:
    """The issue's targets, met or not."""
    by = {r["name"]: r["test"] for r in rows}
    vs = {p["against"]: p["result"] for p in paired}
    unified = by.get(UNIFIED, {})
    out = ["Targets (issue 6):", ""]
    singles = [n for n in by if n not in _NOT_SINGLE and not n.startswith("unified")]
    for lab in LABELS:
        key = f"label.{lab}.recall@100"
        if not unified.get(f"label.{lab}.users"):
            out.append(
                f"- unified vs the best single-task model on {lab}: no {lab} target in "
                "the test window, not measured"
            )
            continue
        best_name = max(singles, key=lambda n: by[n].get(key, 0.0))
        best, got = by[best_name].get(key, 0.0), unified.get(key, 0.0)
        verdict = "met" if got >= best else "missed"
        verdict += _noise(vs.get(best_name, {}).get(f"label.{lab}"))
        out.append(
            f"- {lab} recall@100: unified {got:.4f} vs the best single-task model "
            f"({best_name}) {best:.4f}: {verdict}"
        )
    conv = unified.get("label.conversion.recall@100", 0.0)
    tt = by.get("two-tower, ad clicks only", {}).get("label.conversion.recall@100", 0.0)
    verdict = "met" if conv >= 1.2 * tt and conv > 0 else "missed"
    if not unified.get("label.conversion.users"):
        verdict = "not measured (no conversion target in the test window)"
    out.append(
        f"- unified conversion recall@100 {conv:.4f} vs 1.2 x the click-only two-tower "
        f"({tt:.4f}): {verdict}"
    )
    cold, warm = unified.get("ads.cold.recall@100", 0.0), unified.get("ads.warm.recall@100", 0.0)
    verdict = "met" if warm and cold >= 0.5 * warm else "missed"
    out.append(
        f"- unified cold-start recall@100 {cold:.4f} vs half its warm-ad recall@100 "
        f"({0.5 * warm:.4f}): {verdict}"
    )
    if quotas:
        p = quotas["policies"]
        for k in KS:
            key = f"conversion.recall@{k}"
            got, best = p["learned"].get(key, 0.0), p["best fixed"].get(key, 0.0)
            oracle = p["best fixed on test"].get(key, 0.0)
            verdict = "met" if got > best else "missed"
            paired = p["learned"].get(f"conversion.vs_best_fixed@{k}")
            if paired:
                verdict += f", {paired['wins']} requests won and {paired['losses']} lost; " + (
                    "the interval excludes 0"
                    if _beyond_noise(paired)
                    else "within noise: the interval spans 0"
                )
            out.append(
                f"- learned quotas vs the best fixed quota, conversion recall@{k}: "
                f"{got:.4f} vs {best:.4f}: {verdict} (the fixed split best on the test "
                f"window itself: {oracle:.4f})"
            )
    for lab in LABELS:
        n = int(unified.get(f"label.{lab}.users", 0))
        if 0 < n < 100:
            out.append(
                f"- the {lab} rows rest on {n} users (one user moves recall by about "
                f"{1 / n:.3f}); the paired intervals say which differences exceed that "
                "noise"
            )
    for name, what in (
        ("unified, no scenario adaptation", "scenario adaptation"),
        ("unified, no short-term sequence", "the short-term sequence"),
        ("unified, no long-term summary", "the long-term summary"),
    ):
        other = by.get(name, {})
        if not other:
            continue
        key = "label.{}.recall@100"
        gains = {
            lab: unified.get(key.format(lab), 0.0) - other.get(key.format(lab), 0.0)
            for lab in LABELS
        }
        said = ", ".join(
            f"{lab} {gain:+.4f}{_clear(vs.get(name, {}).get(f'label.{lab}'))}"
            for lab, gain in gains.items()
        )
        verdict = "a gain on every label" if min(gains.values()) > 0 else "not a consistent gain"
        out.append(
            f"- {what} (unified minus unified without it, recall@100): {said}: "
            f"{verdict} on this marketplace"
        )
    return out


def _ratio(d: dict | None) -> tuple[float, bool]:
    """(model / baseline mean recall, whether the paired difference is beyond noise)."""
    if not d or not d.get("baseline"):
        return float("nan"), False
    return d["model"] / d["baseline"], _beyond_noise(d)


def context_figures(result: dict) -> dict[str, dict]:
    """The issue-14 figures of an ablation run, each with its target and whether it is met
    (what docs/benchmarks/headline.json gets)."""
    vs = {p["against"]: p for p in result.get("paired", [])}
    by = {r["name"]: r["test"] for r in result["rows"]}
    out: dict[str, dict] = {}
    ctx = vs.get(WITHOUT_CONTEXT)
    for surface, target in (("search", 1.5), ("related", 1.3)):
        if ctx is None:
            break
        d = ctx["result"].get(f"surface.{surface}.label.click")
        ratio, clear = _ratio(d)
        out[f"context.{surface}_click_recall100_ratio"] = {
            "value": round(ratio, 3),
            "target": f">= {target} and beyond noise",
            "met": bool(ratio >= target and clear),
            "how": f"{surface} click recall@100, the unified model with its context over the "
            f"same model without (paired per user{_noise(d)}; `{ctx['command']}`)",
        }
    home = vs.get("unified, no context")
    if home is not None:
        d = home["result"].get("surface.home")
        out["context.home_recall100_vs_no_context_model"] = {
            "value": round(d["mean"], 4) if d else None,
            "target": "within noise or better (no regression)",
            "met": bool(d and d["high"] >= 0),
            "how": "home recall@100, the unified model minus the same model trained without "
            f"the context modules (paired per user{_noise(d)}; `{home['command']}`)",
        }
    unified, pop = by.get(UNIFIED, {}), by.get(POPULARITY, {})
    key = "label.organic.recall@100"
    if unified.get(key) and pop.get(key):
        ratio = unified[key] / pop[key]
        out["context.organic_recall100_vs_popularity"] = {
            "value": round(ratio, 3),
            "target": ">= 1.5",
            "met": bool(ratio >= 1.5),
            "how": f"organic recall@100 of the unified model ({unified[key]:.4f}) over "
            f"popularity's ({pop[key]:.4f}) on the ablation's test window",
        }
    quotas = result.get("quotas")
    if quotas:
        p = quotas["policies"]
        got, best = (
            p["learned"].get("click.recall@100", 0.0),
            p["best fixed"].get("click.recall@100", 0.0),
        )
        d = p["learned"].get("click.vs_best_fixed@100")
        out["context.learned_quotas_click_recall100_vs_best_fixed"] = {
            "value": round(got - best, 4),
            "target": "> 0 and beyond noise",
            "met": bool(d and got > best and _beyond_noise(d)),
            "how": f"click recall@100 of the learned quotas ({got:.4f}) minus the best fixed "
            f"split's ({best:.4f}){_noise(d)} (`{quotas['command']}`)",
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=3_000)
    p.add_argument("--ads", type=int, default=3_000)
    p.add_argument("--days", type=int, default=21)
    p.add_argument("--eval-days", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--nproc", type=int, default=2)
    # Twice the marketplace's default, so that conversions are common enough to count.
    p.add_argument("--impressions-per-session", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--machine", default="cpu", help="label of the stored results (cpu, gpu)")
    p.add_argument("--workdir", default="data/ablation")
    p.add_argument("--render-only", action="store_true")
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the data, the summaries and every variant already trained in "
        "--workdir (after an interrupted run); the rest runs as usual",
    )
    args = p.parse_args()
    store = RESULTS / f"ablation_{args.machine}.json"
    if not args.render_only:
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(run(args), indent=2))
    result = json.loads(store.read_text())
    write_section("ablation", render(result))
    write_headline(context_figures(result) | generative_figures(result))
    print(render(result))
    print("wrote docs/BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
