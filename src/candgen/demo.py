"""`make demo`: the main job on embedded defaults, end to end as far as candgen goes today.

Synthesizes a small marketplace, computes features (with the ad text embeddings), applies the
Feast repository, materializes into the SQLite online store, looks one user up online, pushes a
real-time engagement, builds a point-in-time training set, trains an HSTU model as a
2-process TorchX job, logs and registers it in MLflow, and promotes it by alias, printing what
each step did.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

from candgen.data.synth import SynthConfig, generate
from candgen.evaluation.evaluate import evaluate_popularity
from candgen.features.build import FeatureBuildConfig, build_features
from candgen.features.store import (
    Engagement,
    StoreConfig,
    apply,
    materialize,
    online_features,
    open_store,
    push_engagements,
)
from candgen.features.training_set import label_rows, training_set
from candgen.registry.tracking import PromotionRefused, default_tracking_uri, promote
from candgen.training.config import JobConfig, TrainConfig
from candgen.training.launch import launch
from candgen.training.trainer import load_data

T = TypeVar("T")


def _step(n: int, title: str, fn: Callable[[], T]) -> T:
    print(f"\n[{n}] {title}", flush=True)
    t0 = time.perf_counter()
    out = fn()
    print(f"    done in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def _names(ids: list[int], titles: dict[int, str], actions: list[str]) -> list[str]:
    return [f"{a:>10}  {titles.get(i, str(i))}" for i, a in zip(ids, actions, strict=True)]


def run_demo(workdir: Path, users: int = 1_000, ads: int = 1_500, days: int = 14) -> int:
    """Runs the demo in ``workdir`` (replaced if it exists) and prints a readable summary."""
    market, features, state = workdir / "marketplace", workdir / "features", workdir / "feast"
    cache = workdir.parent / "cache" / "text_embeddings.parquet"
    for path in (market, features, state):
        shutil.rmtree(path, ignore_errors=True)
    print(f"candgen demo: users={users:,} ads={ads:,} days={days} -> {workdir}/")
    cfg = SynthConfig(users=users, ads=ads, days=days, seed=7)
    summary = _step(1, "synthesize an ads marketplace (users, advertisers, ads, events)",
                    lambda: generate(cfg, market))  # fmt: skip
    ev = summary.events_by_type
    rows = summary.rows
    print(f"    {rows['users']:,} users, {rows['advertisers']:,} advertisers, "
          f"{rows['campaigns']:,} campaigns, {rows['ads']:,} ads, {rows['items']:,} organic "
          "items on 3 surfaces (home, search, related)")  # fmt: skip
    print(f"    events: {ev['engage']:,} organic engagements, {ev['impression']:,} ad impressions, "
          f"{ev['click']:,} clicks (CTR {ev['click'] / max(ev['impression'], 1):.2%}), "
          f"{ev['conversion']:,} attributed conversions "
          f"(CVR {ev['conversion'] / max(ev['click'], 1):.1%})")  # fmt: skip
    print(f"    data snapshot {summary.snapshot[:16]}…")

    manifest = _step(
        2, "compute offline features (sequences, delivery state, MiniLM ad text embeddings)",
        lambda: build_features(market, features, FeatureBuildConfig(), text_cache=cache),
    )  # fmt: skip
    for name, rows in manifest["rows"].items():
        print(f"    {name:<20} {rows:>8,} rows")

    store_cfg = StoreConfig(features_dir=features, state_dir=state)
    applied = _step(3, "feast apply (registry + SQLite online store)", lambda: apply(store_cfg))
    print(f"    entities: {', '.join(applied.entities)}")
    print(f"    feature views: {', '.join(applied.feature_views)}")
    print(f"    feature services: {', '.join(applied.feature_services)}")
    end = _step(4, "materialize into the online store", lambda: materialize(store_cfg))
    print(f"    online values as of {end.isoformat()} (the end of the synthetic log)")

    store = open_store(store_cfg)
    events = pd.read_parquet(market / "events", columns=["user_id", "event_type"])
    user = int(events[events["event_type"] == "click"]["user_id"].value_counts().index[0])
    titles = {
        **dict(pd.read_parquet(market / "items.parquet", columns=["item_id", "title"]).values),
        **dict(pd.read_parquet(market / "ads.parquet", columns=["ad_id", "title"]).values),
    }
    categories = manifest_categories(market)

    def lookup() -> dict:
        return {k: v[0] for k, v in online_features(store, [{"user_id": user}]).items()}

    row = _step(5, f"online lookup of user {user} (feature service user_features_v1)", lookup)
    print(f"    profile: age {row['age_bucket']}, {row['country']}, {row['device']}; "
          f"{row['engagements_total']} engagements, {row['ad_clicks_total']} ad clicks, "
          f"{row['conversions_total']} conversions so far")  # fmt: skip
    aff = np.asarray(row["category_affinity"])
    truth = pd.read_parquet(market / "truth" / "users.parquet").set_index("user_id")
    true_mix = np.asarray(truth.loc[user, "interest"])
    top = ", ".join(f"{categories[i]} {aff[i]:.0%}" for i in np.argsort(-aff)[:3])
    true_top = ", ".join(f"{categories[i]} {true_mix[i]:.0%}" for i in np.argsort(-true_mix)[:3])
    print(f"    long-term interests (from features): {top}")
    print(f"    hidden ground truth interests:        {true_top}")
    print(f"    across all users, feature vs true interest cosine: "
          f"{_affinity_agreement(features, truth):.2f} (1 = identical)")  # fmt: skip
    print("    last 5 engagements (short-term sequence, newest last):")
    for line in _names(row["recent_item_ids"][-5:], titles, row["recent_action_types"][-5:]):
        print(f"      {line}")

    ads = pd.read_parquet(market / "ads.parquet", columns=["ad_id", "category"])
    ad_id = int(ads[ads["category"] == categories[int(np.argmax(aff))]]["ad_id"].iloc[0])
    new_event = Engagement(user, ad_id, "click", "home", end + timedelta(minutes=1))

    def push() -> dict:
        push_engagements(store, [new_event])
        return lookup()

    after = _step(6, f"push a real-time click on {titles.get(ad_id, ad_id)!r}", push)
    print(f"    short-term sequence now ends with: {after['recent_item_ids'][-3:]} "
          f"({len(after['recent_item_ids'])} items kept)")  # fmt: skip

    def pit() -> pd.DataFrame:
        rows = label_rows(market, "click")
        return training_set(store, rows.sample(min(3_000, len(rows)), random_state=0))

    ts = _step(7, "point-in-time training set (feature service training_v1, click label)", pit)
    has_seq = ts["recent_item_ids"].map(lambda v: v is not None and len(v) > 0)
    print(f"    {len(ts):,} impressions x {ts.shape[1]} columns, click rate "
          f"{ts['label'].mean():.2%}; {has_seq.mean():.0%} have a short-term sequence "
          "as of their impression time")  # fmt: skip

    train_cfg = TrainConfig(
        dataset="marketplace", data_dir=str(market), features_dir=str(features),
        model="hstu", epochs=DEMO_EPOCHS, lr=3e-3, eval_every=5, eval_days=2, max_len=50,
        batch_size=128, out_dir=str(workdir / "train"), register_as=DEMO_MODEL_NAME,
    )  # fmt: skip
    metrics = _step(
        8, "train an HSTU model with TorchX (2 processes, DDP over gloo), log it to MLflow "
        "and register it as the challenger", lambda: launch(train_cfg, JobConfig(nproc=2)),
    )  # fmt: skip
    _print_metrics(metrics, market, train_cfg)
    promoted = _step(9, f"promote {DEMO_MODEL_NAME}: champion moves only if the challenger "
                     "is at least as good", lambda: _try_promote(DEMO_MODEL_NAME))  # fmt: skip
    print(f"    {promoted}")

    _serve_and_query(workdir, store_cfg, features, titles, [user, *_other_users(features, user)])

    print("\nNext:")
    print(f"  candgen features online --user-id {user} --features-dir {features} "
          f"--state-dir {state}")  # fmt: skip
    print(f"  candgen features push --user-id {user} --item-id {ad_id} --action-type click "
          f"--features-dir {features} --state-dir {state}")  # fmt: skip
    print("  make test   # the whole suite, against real SQLite, DuckDB, Redis and PostgreSQL")
    print(f"  mlflow ui --backend-store-uri {default_tracking_uri()}   # then open "
          "http://127.0.0.1:5000 (runs, plots, the registry)")  # fmt: skip
    print(f"  candgen registry show --name {DEMO_MODEL_NAME}")
    print(f"  candgen features serve --features-dir {features} --state-dir {state} &   # then:")
    print(f"  candgen serve --model-repository {workdir / 'model_repository'} && "
          f"candgen query {user} --scenario search -k 20 && candgen serve --stop")  # fmt: skip
    return 0


def _other_users(features: Path, user: int) -> list[int]:
    """A second known user, and one the feature store has never seen (cold start)."""
    users = pd.read_parquet(features / "user_short_term.parquet", columns=["user_id"])["user_id"]
    other = int(next(u for u in sorted(set(users.tolist())) if u != user))
    return [other, 99_999_999]


def _serve_and_query(
    workdir: Path, store_cfg: StoreConfig, features: Path, titles: dict[int, str],
    users: list[int],
) -> None:  # fmt: skip
    """Exports the champion, serves it with the real tritonserver, queries it, shuts it down."""
    from candgen.features.store import FeatureServerProcess
    from candgen.serving.client import RetrieveClient
    from candgen.serving.export import ExportConfig, export
    from candgen.serving.runtime import ServerConfig, endpoints, start, stop
    from candgen.serving.steps import ServingConfig

    repo = workdir / "model_repository"
    feature_server = FeatureServerProcess(store_cfg, port=6566, log=workdir / "feature_server.log")
    server = ServerConfig(model_repository=str(repo), state_dir=str(workdir / "triton"),
                          ready_timeout_s=180)  # fmt: skip
    cfg = ExportConfig(model_uri=f"models:/{DEMO_MODEL_NAME}@champion", out=str(repo),
                       features_dir=str(features),
                       serving=ServingConfig(feature_server_url=feature_server.url))  # fmt: skip
    exported = _step(10, f"export {DEMO_MODEL_NAME}@champion as a Triton model repository "
                     "(ensemble retrieve: features -> user encoder -> generators -> quotas)",
                     lambda: export(cfg))  # fmt: skip
    print(f"    {repo}/ holds v{exported['version']} (run {exported['run_id'][:12]}…, "
          f"commit {exported['git_commit'][:12]})")  # fmt: skip
    try:
        _step(11, f"start the Feast feature server ({feature_server.url}) and tritonserver",
              lambda: (feature_server.start(), start(server)))  # fmt: skip
        ends = endpoints(server)
        print(f"    HTTP {ends['http']}, gRPC {ends['grpc']}, metrics {ends['metrics']}")

        def ask() -> None:
            http, grpc = RetrieveClient(ends["http"], "http"), RetrieveClient(ends["grpc"], "grpc")
            for i, uid in enumerate(users):
                for surface in ("home", "search", "related"):
                    client = grpc if (i + len(surface)) % 2 else http
                    t0 = time.perf_counter()
                    res = client.retrieve(uid, surface, 100)
                    ms = (time.perf_counter() - t0) * 1e3
                    mix = ", ".join(f"{s} {res.sources.count(s)}"
                                    for s in dict.fromkeys(res.sources))  # fmt: skip
                    flag = "  [cold start]" if res.cold_start else ""
                    flag += "  [fallback]" if res.fallback else ""
                    print(f"    user {uid} on {surface:<8} {len(res.ad_ids)} ads in {ms:5.1f} ms "
                          f"over {client.protocol:<4} ({mix}){flag}")  # fmt: skip
                    for ad, score, source in list(zip(res.ad_ids, res.scores, res.sources,
                                                      strict=True))[:3]:  # fmt: skip
                        print(f"        {score:7.3f}  {source:<10}  {titles.get(ad, ad)}")

        _step(12, "ask the live ensemble for 100 ads per user and surface (top 3 shown)", ask)
    finally:
        stopped = stop(server)
        feature_server.stop()
        print(f"    tritonserver {'stopped' if stopped else 'was not running'}; "
              "feature server stopped")  # fmt: skip


DEMO_MODEL_NAME = "candgen-demo-hstu"
# On the demo marketplace HSTU passes the popularity baseline's HR@10 after about 20 epochs
# (lr 3e-3); 30 leave a margin and take about 20 s.
DEMO_EPOCHS = 30


def _print_metrics(metrics: dict, market: Path, cfg: TrainConfig) -> None:
    test = metrics["test"]
    data = load_data(cfg)
    pop = evaluate_popularity(data, "test")
    reg = metrics["registered"]
    print(f"    {int(test['users']):,} users with targets in the last {cfg.eval_days} days; "
          f"MLflow run {metrics.get('run_id', '?')[:12]}…, registered {reg['name']} "
          f"v{reg['version']} as challenger")  # fmt: skip
    print(f"    {'':<26}{cfg.model:>10}{'popularity':>12}")
    for key in ("hr@10", "recall@50", "recall@100", "ndcg@10", "coverage@100"):
        print(f"    {key:<26}{test[key]:>10.4f}{pop.get(key, float('nan')):>12.4f}")
    for group in ("label", "surface"):
        names = sorted({k.split(".")[1] for k in test if k.startswith(group + ".")})
        for name in names:
            key = f"{group}.{name}.recall@100"
            print(f"    {key:<26}{test[key]:>10.4f}{pop.get(key, float('nan')):>12.4f}"
                  f"   ({int(test[f'{group}.{name}.users'])} users)")  # fmt: skip


def _try_promote(name: str) -> str:
    try:
        with warnings.catch_warnings():
            # Imports earlier in the demo re-enable this MLflow/SQLAlchemy deprecation warning.
            warnings.filterwarnings("ignore", message="The ``noload`` loader strategy")
            out = promote(name)
    except PromotionRefused as e:
        return f"refused: {e}"
    return (
        f"{out['status']}: champion is v{out['champion']} ({out['metric']} = "
        f"{float(out['challenger_value']):.4f})"
    )


def _affinity_agreement(features: Path, truth: pd.DataFrame) -> float:
    """Mean cosine between each user's latest category_affinity feature and true interests."""
    long = pd.read_parquet(features / "user_long_term.parquet", columns=["user_id",
                           "event_timestamp", "category_affinity"])  # fmt: skip
    latest = long.sort_values("event_timestamp").groupby("user_id").tail(1).set_index("user_id")
    a = np.stack(latest["category_affinity"].to_numpy())
    t = np.stack(truth.loc[latest.index, "interest"].to_numpy())
    cos = (a * t).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(t, axis=1) + 1e-12)
    return float(cos.mean())


def manifest_categories(market: Path) -> list[str]:
    import json

    return list(json.loads((market / "manifest.json").read_text())["categories"])
