"""`make demo`: the KFP retrieval pipeline run locally end to end, then a live Triton queried.

1. start tritonserver on an empty model repository (explicit model control);
2. run ``retrieval_pipeline`` with kfp.local: synthetic marketplace, features, Feast apply and
   materialize, point-in-time training set, a 2-process TorchX training job logged to MLflow,
   evaluation beside popularity, the registry gate, the FAISS index, the Triton repository and
   the deploy step, which swaps the new version into the running server;
3. print each step's outcome;
4. start the lean online-read front (``features serve --lean``) over the store the pipeline
   materialized;
5. ask the live ensemble for 100 ads per user on home, search (with the user's own query) and
   related (with the user's own context item), for two heavy clickers and one unknown user: the
   top 3 of each surface side by side with each ad's generator, the flags, and how much of
   home's top 100 search and related share;
6. measure that overlap over the 30 users with the most ad clicks and write it to
   ``<workdir>/surface_overlap.json`` (benchmarks/surface_overlap.py records it);
7. stop both servers and print how to open the MLflow UI on the training run.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd

from candgen.orchestrate import LocalRun, run_local
from candgen.registry.tracking import client, default_tracking_uri

if TYPE_CHECKING:
    from candgen.endpoint.client import RetrieveClient
    from candgen.endpoint.surface_context import SurfaceContext

T = TypeVar("T")

DEMO_MODEL_NAME = "candgen-demo-unified"
# On the demo marketplace HSTU passes the popularity baseline's HR@10 after about 20 epochs
# (lr 3e-3); 30 leave a margin and take about 20 s.
DEMO_EPOCHS = 30
FEATURE_SERVER_PORT = 6566
COLD_START_USER = 99_999_999
SURFACES = ("home", "search", "related")
K = 100  # ads asked per request; the overlap is of the top K
OVERLAP_USERS = 30  # the users with the most ad clicks whose overlap is averaged
COLUMN = 40  # characters per surface in the side-by-side view


def _step(n: int, title: str, fn: Callable[[], T]) -> T:
    print(f"\n[{n}] {title}", flush=True)
    t0 = time.perf_counter()
    out = fn()
    print(f"    done in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def run_demo(workdir: Path, users: int = 1_000, ads: int = 1_500, days: int = 14) -> int:
    """Runs the demo in ``workdir`` (replaced if it exists) and prints what each step did.

    Returns:
        0 when the pipeline ran (a model the gate refuses is reported, not an error).
    """
    from candgen.endpoint.runtime import ServerConfig, endpoints, start, stop

    workdir = Path(workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    repo = workdir / "model_repository"
    repo.mkdir(parents=True)
    tracking_uri = default_tracking_uri()
    server = ServerConfig(
        model_repository=str(repo), state_dir=str(workdir / "triton"), ready_timeout_s=180
    )
    print(f"candgen demo: users={users:,} ads={ads:,} days={days} -> {workdir}/")
    _step(
        1,
        "start tritonserver on an empty model repository (explicit model control)",
        lambda: start(server),
    )
    ends = endpoints(server)
    print(f"    HTTP {ends['http']}, gRPC {ends['grpc']}, metrics {ends['metrics']}")
    try:
        arguments = {
            "users": users,
            "ads": ads,
            "days": days,
            "epochs": DEMO_EPOCHS,
            "model_name": DEMO_MODEL_NAME,
            "tracking_uri": tracking_uri,
            "target_repository": str(repo),
            "triton_url": ends["grpc"],  # the deploy step asks for loads over gRPC
            "feature_server_url": f"http://127.0.0.1:{FEATURE_SERVER_PORT}",
        }
        root = workdir / "pipeline_root"
        run = _step(
            2,
            "run the KFP pipeline retrieval_pipeline with kfp.local (each step's log follows)",
            lambda: run_local(arguments, root),
        )
        print("\n[3] what each step did")
        for task, outcome in run.outcomes():
            print(f"    {task:<18} {outcome}")
        print(f"    {run.message}")
        _link_outputs(run, workdir)
        if run.outputs("deploy") is None:
            print(
                "    The gate refused the model, so nothing was deployed and there is nothing "
                "new to query."
            )
        else:
            _query_live_ensemble(run, ends, workdir)
    finally:
        stopped = stop(server)
        print(f"    tritonserver {'stopped' if stopped else 'was not running'}")
    _print_next(run, tracking_uri, repo)
    return 0


# Stable names for the run's artifacts, which the README's commands use.
SHORTCUTS = {
    "marketplace": ("synth-data", "marketplace"),
    "features": ("build-features", "features"),
    "feast": ("feature-store", "store"),
}


def _link_outputs(run: LocalRun, workdir: Path) -> None:
    for name, (task, artifact) in SHORTCUTS.items():
        (workdir / name).symlink_to(run.artifact(task, artifact), target_is_directory=True)
    print(
        f"    {workdir}/{{{','.join(SHORTCUTS)}}} link to the run's marketplace, features and "
        "Feast store"
    )


def _query_live_ensemble(run: LocalRun, ends: dict[str, str], workdir: Path) -> None:
    """Serves the pipeline's feature store over HTTP and asks the live ensemble for ads: a few
    users' three surfaces side by side, then the surfaces' overlap over more users."""
    from candgen.endpoint.client import RetrieveClient
    from candgen.endpoint.surface_context import EVENT_COLUMNS, ITEM_COLUMNS, choose_contexts
    from candgen.features.store import FeatureServerProcess, StoreConfig

    market = run.artifact("synth-data", "marketplace")
    features = run.artifact("build-features", "features")
    store = StoreConfig(features_dir=features, state_dir=run.artifact("feature-store", "store"))
    log = run.run_dir.parent / "feature_server.log"
    feature_server = FeatureServerProcess(store, port=FEATURE_SERVER_PORT, log=log, lean=True)
    events = pd.read_parquet(market / "events", columns=list(EVENT_COLUMNS))
    items = pd.read_parquet(market / "items.parquet", columns=list(ITEM_COLUMNS))
    titles: dict[int, str] = dict(
        pd.read_parquet(market / "ads.parquet", columns=["ad_id", "title"]).values
    )
    item_titles: dict[int, str] = dict(items[["item_id", "title"]].values)
    try:
        _step(
            4,
            f"start the online-read front ({feature_server.url}) over the store the "
            "pipeline materialized",
            feature_server.start,
        )
        http, grpc = RetrieveClient(ends["http"], "http"), RetrieveClient(ends["grpc"], "grpc")
        users = _sample_users(events)
        contexts = choose_contexts(events, items, users)

        def ask() -> None:
            for i, uid in enumerate(users):
                _show_user(uid, contexts[uid], (http, grpc)[i % 2], titles, item_titles)

        _step(
            5,
            f"ask the live ensemble for {K} ads per user on home, search (the user's query) "
            f"and related (the user's context item); top 3 side by side, overlap of the top {K}",
            ask,
        )
        model = _deployed_model(run)
        _step(
            6,
            f"measure the surfaces' overlap over the {OVERLAP_USERS} users with the most ad "
            "clicks (each with their own query and context item)",
            lambda: _measure_overlap(http, events, items, workdir, model),
        )
    finally:
        feature_server.stop()
        print("    feature server stopped")


def _show_user(
    uid: int,
    context: SurfaceContext,
    rc: RetrieveClient,
    titles: dict[int, str],
    item_titles: dict[int, str],
) -> None:
    """One user's home, search and related answers: a line per surface (latency, quotas,
    flags), their top 3 side by side, and how much of home's top K each other surface shares."""
    from candgen.endpoint.client import ServingError
    from candgen.endpoint.surface_context import overlap_at_k

    query = f'"{context.query}" ({context.query_source})' if context.query else "none"
    item = context.context_item_id
    shown = (
        f"item {item} {item_titles.get(item, '(not in the catalogue)')!r} "
        f"({context.context_source})"
        if item is not None
        else "none"
    )
    print(f"    user {uid}: search query {query}; related context {shown}")
    answers: dict[str, list[tuple[str, str]]] = {}
    ads: dict[str, list[int]] = {}
    for surface in SURFACES:
        kwargs = _context_kwargs(surface, context)
        t0 = time.perf_counter()
        try:
            res = rc.retrieve(uid, surface, K, **kwargs)
        except ServingError as e:
            print(f"      {surface:<8} error: {e}")
            answers[surface] = []
            continue
        ms = (time.perf_counter() - t0) * 1e3
        mix = ", ".join(f"{s} {n}" for s, n in res.source_counts.items())
        flags = f"  FLAGS {','.join(res.flags)}" if res.flags else ""
        print(
            f"      {surface:<8} {len(res.ad_ids)} ads in {ms:5.1f} ms over {rc.protocol:<4} "
            f"({res.quota_policy} quotas: {mix}){flags}"
        )
        ads[surface] = res.ad_ids
        answers[surface] = [
            (source, str(titles.get(ad, ad)))
            for ad, source in zip(res.ad_ids, res.sources, strict=True)
        ][:3]
    width = COLUMN - 2
    print("      " + "".join(f"{s:<{COLUMN}}" for s in SURFACES).rstrip())
    for row in range(3):
        cells = []
        for surface in SURFACES:
            got = answers[surface]
            text = f"{got[row][0]}: {got[row][1]}" if row < len(got) else "-"
            cells.append(f"{text[:width]:<{COLUMN}}")
        print("      " + "".join(cells).rstrip())
    if "home" in ads:
        parts = [
            f"|home ∩ {s}| / {K} = {overlap_at_k(ads['home'], ads[s], K):.2f}"
            for s in SURFACES[1:]
            if s in ads
        ]
        print("      overlap of the top " + f"{K}: " + ", ".join(parts))


def _context_kwargs(surface: str, context: SurfaceContext) -> dict[str, Any]:
    """The request's context for a surface: the query on search, the item on related."""
    if surface == "search" and context.query is not None:
        return {"query": context.query}
    if surface == "related" and context.context_item_id is not None:
        return {"context_item_id": context.context_item_id}
    return {}


def _measure_overlap(
    rc: RetrieveClient,
    events: pd.DataFrame,
    items: pd.DataFrame,
    workdir: Path,
    model: dict[str, str],
) -> None:
    """Mean |home ∩ search| / K and |home ∩ related| / K over the users with the most ad
    clicks, printed and written to ``workdir/surface_overlap.json``."""
    from candgen.endpoint.client import ServingError
    from candgen.endpoint.surface_context import (
        choose_contexts,
        mean_overlap,
        most_clicking_users,
    )

    t0 = time.perf_counter()
    users = most_clicking_users(events, OVERLAP_USERS)
    contexts = choose_contexts(events, items, users)
    pairs: dict[str, list[tuple[list[int], list[int]]]] = {"search": [], "related": []}
    errors = 0
    for uid in users:
        try:
            got = {
                s: rc.retrieve(uid, s, K, **_context_kwargs(s, contexts[uid])).ad_ids
                for s in SURFACES
            }
        except ServingError as e:
            errors += 1
            print(f"    user {uid}: {e}")
            continue
        for s in pairs:
            pairs[s].append((got["home"], got[s]))
    n = len(pairs["search"])
    result = {
        "users": n,
        "home_search_overlap_top100": round(mean_overlap(pairs["search"], K), 4),
        "home_related_overlap_top100": round(mean_overlap(pairs["related"], K), 4),
        "k": K,
        "model": model,
        "refused": errors,
        "command": "make demo (candgen demo, step 6)",
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs",
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    out = workdir / "surface_overlap.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"    mean overlap of the top {K} over {n} users"
        f"{f' ({errors} refused)' if errors else ''}: home/search "
        f"{result['home_search_overlap_top100']:.3f}, home/related "
        f"{result['home_related_overlap_top100']:.3f} -> {out}"
    )


def _deployed_model(run: LocalRun) -> dict[str, str]:
    """The registered model version and training run the Triton repository was exported from."""
    outputs = run.outputs("export-repository")
    if outputs is None:
        return {}
    meta = outputs["artifacts"]["repository"]["artifacts"][0].get("metadata", {})
    return {k: str(meta[k]) for k in ("model_uri", "run_id", "version") if k in meta}


def _sample_users(events: pd.DataFrame) -> list[int]:
    """The two users with the most ad clicks, and one the feature store has never seen."""
    from candgen.endpoint.surface_context import most_clicking_users

    return [*most_clicking_users(events, 2), COLD_START_USER]


def _print_next(run: LocalRun, tracking_uri: str, repo: Path) -> None:
    train = run.outputs("train")
    print("\nNext:")
    if train:
        run_id = train["parameterValues"]["Output"]
        experiment = client(tracking_uri).get_run(run_id).info.experiment_id
        print(
            f"  mlflow ui --backend-store-uri {tracking_uri}   # the training run: "
            f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}"
        )
    print(f"  candgen registry show --name {DEMO_MODEL_NAME}")
    print(
        f"  candgen serve --model-repository {repo}   # then: candgen query <user> "
        "--scenario search -k 20 (with the feature server up)"
    )
    print("  make pipeline ARGS='--set epochs=5'   # the same pipeline, other parameters")
    print("  make test   # the whole suite, against real SQLite, DuckDB, Redis and PostgreSQL")
