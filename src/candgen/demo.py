"""`make demo`: the KFP retrieval pipeline run locally end to end, then a live Triton queried.

1. start tritonserver on an empty model repository (explicit model control);
2. run ``retrieval_pipeline`` with kfp.local: synthetic marketplace, features, Feast apply and
   materialize, point-in-time training set, a 2-process TorchX training job logged to MLflow,
   evaluation beside popularity, the registry gate, the FAISS index, the Triton repository and
   the deploy step, which swaps the new version into the running server;
3. print each step's outcome;
4. start the Feast feature server over the store the pipeline materialized and ask the live
   ensemble for ads on every surface;
5. stop both servers and print how to open the MLflow UI on the training run.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pandas as pd

from candgen.orchestrate import LocalRun, run_local
from candgen.registry.tracking import client, default_tracking_uri

T = TypeVar("T")

DEMO_MODEL_NAME = "candgen-demo-unified"
# On the demo marketplace HSTU passes the popularity baseline's HR@10 after about 20 epochs
# (lr 3e-3); 30 leave a margin and take about 20 s.
DEMO_EPOCHS = 30
FEATURE_SERVER_PORT = 6566
COLD_START_USER = 99_999_999


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
            "triton_url": ends["http"],
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
            _query_live_ensemble(run, ends)
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


def _query_live_ensemble(run: LocalRun, ends: dict[str, str]) -> None:
    """Serves the pipeline's feature store over HTTP and asks the live ensemble for ads."""
    from candgen.endpoint.client import RetrieveClient
    from candgen.features.store import FeatureServerProcess, StoreConfig

    market = run.artifact("synth-data", "marketplace")
    features = run.artifact("build-features", "features")
    store = StoreConfig(features_dir=features, state_dir=run.artifact("feature-store", "store"))
    log = run.run_dir.parent / "feature_server.log"
    feature_server = FeatureServerProcess(store, port=FEATURE_SERVER_PORT, log=log)
    titles = dict(pd.read_parquet(market / "ads.parquet", columns=["ad_id", "title"]).values)
    try:
        _step(
            4,
            f"start the Feast feature server ({feature_server.url}) over the store the "
            "pipeline materialized",
            feature_server.start,
        )

        def ask() -> None:
            http, grpc = RetrieveClient(ends["http"], "http"), RetrieveClient(ends["grpc"], "grpc")
            for i, uid in enumerate(_sample_users(market)):
                for surface in ("home", "search", "related"):
                    rc = grpc if (i + len(surface)) % 2 else http
                    t0 = time.perf_counter()
                    res = rc.retrieve(uid, surface, 100)
                    ms = (time.perf_counter() - t0) * 1e3
                    mix = ", ".join(f"{s} {n}" for s, n in res.source_counts.items())
                    flag = "  [cold start]" if res.cold_start else ""
                    flag += "  [fallback]" if res.fallback else ""
                    print(
                        f"    user {uid} on {surface:<8} {len(res.ad_ids)} ads in {ms:5.1f} ms "
                        f"over {rc.protocol:<4} ({res.quota_policy} quotas: {mix})"
                        f"{flag}"
                    )
                    for ad, score, source in list(
                        zip(res.ad_ids, res.scores, res.sources, strict=True)
                    )[:3]:
                        print(f"        {score:7.3f}  {source:<10}  {titles.get(ad, ad)}")

        _step(5, "ask the live ensemble for 100 ads per user and surface (top 3 shown)", ask)
    finally:
        feature_server.stop()
        print("    feature server stopped")


def _sample_users(market: Path) -> list[int]:
    """The two users with the most ad clicks, and one the feature store has never seen."""
    events = pd.read_parquet(market / "events", columns=["user_id", "event_type"])
    clickers = events[events["event_type"] == "click"]["user_id"].value_counts()
    return [int(u) for u in clickers.index[:2]] + [COLD_START_USER]


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
