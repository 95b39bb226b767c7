"""Offline feature tables: sequences are point-in-time by construction, embeddings are real."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from candgen.data.synth import SynthSummary
from candgen.errors import CandgenError, ConfigError
from candgen.features.build import (
    FEATURE_TABLES,
    LONG_TERM_TABLE,
    FeatureBuildConfig,
    build_features,
    check_campaign_targeting,
)
from candgen.features.text import EMBEDDING_DIM, TextEmbedder
from candgen.vocab import DELIVERY_SHARDS


def test_every_table_and_manifest(features_dir: Path, marketplace: SynthSummary) -> None:
    manifest = json.loads((features_dir / "manifest.json").read_text())
    assert manifest["source_snapshot"] == marketplace.snapshot
    assert manifest["text_model"] == "all-MiniLM-L6-v2"
    for name in FEATURE_TABLES:
        df = pd.read_parquet(features_dir / f"{name}.parquet")
        # The long-term summaries come later, from the summariser (candgen features long-term).
        assert len(df) == manifest["rows"][name] and (len(df) > 0) == (name != LONG_TERM_TABLE)
        assert str(df["event_timestamp"].dtype) == "datetime64[us, UTC]"


def test_short_term_snapshots_hold_only_earlier_events(
    features_dir: Path, marketplace: SynthSummary
) -> None:
    short = pd.read_parquet(features_dir / "user_short_term.parquet")
    stamp_s = short["event_timestamp"].astype("int64") // 10**6
    assert short["recent_item_ids"].map(len).between(1, 8).all()
    newest = short["recent_timestamps"].map(max)
    oldest = short["recent_timestamps"].map(min)
    assert (newest <= stamp_s).all()
    assert (newest >= stamp_s - 1).all()  # stamped when its newest event arrived
    assert (oldest <= newest).all()
    # Recompute one user's last snapshot from the raw log.
    events = pd.read_parquet(marketplace.out_dir / "events")
    user = int(short["user_id"].value_counts().index[0])
    last = short[short.user_id == user].sort_values("event_timestamp").iloc[-1]
    mine = events[
        (events.user_id == user)
        & events.event_type.isin(["engage", "click", "conversion"])
        & (events.arrival_ts <= last["event_timestamp"])
    ].sort_values("arrival_ts")
    expected = mine["item_id"].fillna(mine["ad_id"]).astype(np.int64).tail(8).tolist()
    assert list(last["recent_item_ids"]) == expected
    assert list(last["recent_action_types"]) == mine["action_type"].tail(8).tolist()


def test_long_term_affinity_is_a_distribution(features_dir: Path) -> None:
    long = pd.read_parquet(features_dir / "user_long_term.parquet")
    aff = np.stack(long["category_affinity"].to_numpy())
    assert np.allclose(aff.sum(axis=1), 1.0, atol=1e-5)
    assert (long["long_item_ids"].map(len) <= 200).all()
    totals = long.sort_values("event_timestamp").groupby("user_id")["engagements_total"]
    assert (totals.diff().dropna() >= 0).all()  # lifetime counts never go down


def test_ad_delivery_state(features_dir: Path, marketplace: SynthSummary) -> None:
    delivery = pd.read_parquet(features_dir / "ad_delivery.parquet")
    assert set(delivery["status"]) <= {"active", "paused", "exhausted"}
    assert delivery["ctr_7d"].between(0, 1).all() and delivery["cvr_7d"].between(0, 1).all()
    assert (delivery["budget_remaining"] >= 0).all()
    ads = pd.read_parquet(marketplace.out_dir / "ads.parquet")
    paused = ads[ads.status == "paused"]["ad_id"]
    assert len(paused) > 0
    latest = delivery.sort_values("event_timestamp").groupby("ad_id").tail(1).set_index("ad_id")
    assert (latest.loc[latest.index.intersection(paused), "status"] == "paused").all()


def test_ad_text_embeddings_carry_meaning(features_dir: Path) -> None:
    attrs = pd.read_parquet(features_dir / "ad_attributes.parquet")
    emb = np.stack(attrs["text_embedding"].to_numpy())
    assert emb.shape == (len(attrs), EMBEDDING_DIM)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    same = attrs["category"].to_numpy()[:, None] == attrs["category"].to_numpy()[None, :]
    sim = emb @ emb.T
    off_diag = ~np.eye(len(attrs), dtype=bool)
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.1


def test_embedding_cache_skips_the_model(features_dir: Path) -> None:
    cached = TextEmbedder(features_dir / "text_cache.parquet", progress=False)
    attrs = pd.read_parquet(features_dir / "ad_attributes.parquet")
    # Every text of the build is in the cache, so no model is loaded to embed it again.
    first = np.asarray(attrs["text_embedding"].iloc[0], dtype=np.float32)
    assert cached._cache, "the build wrote no cache"
    key_vec = next(iter(cached._cache.values()))
    assert key_vec.shape == (EMBEDDING_DIM,)
    assert any(np.allclose(first, v) for v in cached._cache.values())
    assert cached._model is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"short_seq_len": 0}, "short_seq_len"),
        ({"long_seq_len": 5, "short_seq_len": 10}, "long_seq_len"),
        ({"delivery_window_days": 0}, "delivery_window_days"),
    ],
)
def test_bad_feature_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        FeatureBuildConfig(**kwargs)
    assert err.value.field == field


def test_build_rejects_a_folder_that_is_not_a_marketplace(tmp_path: Path) -> None:
    with pytest.raises(CandgenError, match="candgen data synth"):
        build_features(tmp_path, tmp_path / "out", progress=False)


def test_campaign_delivery_follows_the_plan_and_the_pauses(
    features_dir: Path, marketplace: SynthSummary
) -> None:
    delivery = pd.read_parquet(features_dir / "campaign_delivery.parquet")
    campaigns = pd.read_parquet(marketplace.out_dir / "campaigns.parquet").set_index("campaign_id")
    plan = pd.read_parquet(marketplace.out_dir / "delivery_plan.parquet")
    assert set(delivery["status"]) == {"active", "paused", "exhausted"}
    assert delivery["throttle"].between(0, 1).all() and (delivery["throttle"] < 1).any()
    # every exhaustion in the plan of a running, unpaused campaign is a row at that time
    exhausted = delivery[delivery["status"] == "exhausted"]
    planned = plan.dropna(subset=["exhausted_ts"])
    assert set(exhausted["event_timestamp"]) <= set(planned["exhausted_ts"])
    paused = campaigns.dropna(subset=["paused_ts"])
    last = delivery.sort_values("event_timestamp").groupby("campaign_id").last()
    assert (last.loc[paused.index, "status"] == "paused").all()
    for column in ("target_countries", "target_surfaces", "pacing"):
        got = last[column].map(lambda v: list(v) if isinstance(v, np.ndarray) else v)
        want = campaigns.loc[last.index, column]
        assert (
            got.tolist() == want.map(lambda v: list(v) if isinstance(v, np.ndarray) else v).tolist()
        )
    assert np.allclose(last["daily_budget"], campaigns.loc[last.index, "daily_budget"], rtol=1e-6)


def test_delivery_shards_list_every_campaign_not_simply_active(features_dir: Path) -> None:
    delivery = pd.read_parquet(features_dir / "campaign_delivery.parquet")
    shards = pd.read_parquet(features_dir / "delivery_shard.parquet")
    assert sorted(shards["delivery_shard_id"]) == list(range(DELIVERY_SHARDS))
    last = delivery.sort_values("event_timestamp").groupby("campaign_id").last()
    special = set(last.index[(last["status"] != "active") | (last["throttle"] < 1)])
    listed = {}
    for row in shards.itertuples():
        assert len(row.campaign_ids) == len(row.statuses) == len(row.targeting_masks)
        for cid, status in zip(row.campaign_ids, row.statuses, strict=True):
            assert cid % DELIVERY_SHARDS == row.delivery_shard_id
            listed[int(cid)] = status
    assert set(listed) == special and special
    assert all(listed[c] == last.loc[c, "status"] for c in listed)


def test_impression_counts_per_user_day_sum_to_the_log(
    features_dir: Path, marketplace: SynthSummary
) -> None:
    counts = pd.read_parquet(features_dir / "user_ad_impressions.parquet")
    events = pd.read_parquet(marketplace.out_dir / "events", columns=["event_type", "user_id"])
    assert (
        counts["ad_impression_counts"].map(sum).sum()
        == (events["event_type"] == "impression").sum()
    )
    assert (
        counts["ad_impression_counts"].map(sum) == counts["advertiser_impression_counts"].map(sum)
    ).all()
    assert counts["ad_impression_counts"].map(max).max() <= 3  # the marketplace's cap
    assert not counts.duplicated(["user_id", "impression_day"]).any()


def test_hidden_advertiser_lists_grow_per_hide(
    features_dir: Path, marketplace: SynthSummary
) -> None:
    lists = pd.read_parquet(features_dir / "user_hidden_advertisers.parquet")
    hides = pd.read_parquet(marketplace.out_dir / "hidden_advertisers.parquet")
    assert len(lists) == len(hides) > 0
    last = lists.sort_values("event_timestamp").groupby("user_id")["hidden_advertiser_ids"].last()
    want = hides.groupby("user_id")["advertiser_id"].agg(set)
    assert {u: set(v) for u, v in last.items()} == want.to_dict()


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("target_countries", ["US", "Atlantis"], "unknown value(s) ['Atlantis']"),
        ("target_devices", "ios", "must be a list of strings"),
        ("target_age_buckets", [17], "must be a list of strings"),
    ],
)
def test_malformed_targeting_names_the_campaign_and_field(
    marketplace: SynthSummary, column: str, value: object, message: str
) -> None:
    campaigns = pd.read_parquet(marketplace.out_dir / "campaigns.parquet")
    campaigns[column] = campaigns[column].astype(object)
    campaigns.at[3, column] = value
    cid = int(campaigns.at[3, "campaign_id"])
    with pytest.raises(ConfigError) as err:
        check_campaign_targeting(campaigns)
    assert err.value.field == column
    assert f"campaign {cid}: " in str(err.value) and message in str(err.value)
