"""The synthetic marketplace: determinism, statistical shape, attribution, bad sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from candgen.data.synth import AD_ID_OFFSET, SURFACES, SynthConfig, SynthSummary, generate
from candgen.errors import ConfigError
from tests.conftest import SMALL


@pytest.fixture(scope="module")
def events(marketplace: SynthSummary) -> pd.DataFrame:
    return pd.read_parquet(marketplace.out_dir / "events")


def test_same_seed_same_files(marketplace: SynthSummary, tmp_path: Path) -> None:
    again = generate(SMALL, tmp_path / "again", progress=False)
    assert again.snapshot == marketplace.snapshot
    assert again.rows == marketplace.rows


def test_other_seed_other_data(marketplace: SynthSummary, tmp_path: Path) -> None:
    cfg = SynthConfig(**{**SMALL.__dict__, "seed": SMALL.seed + 1})
    assert generate(cfg, tmp_path / "other", progress=False).snapshot != marketplace.snapshot


def test_tables_and_manifest(marketplace: SynthSummary) -> None:
    out = marketplace.out_dir
    for name in (
        "users",
        "advertisers",
        "campaigns",
        "ads",
        "items",
        "surfaces",
        "delivery_plan",
        "hidden_advertisers",
    ):
        assert (out / f"{name}.parquet").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["snapshot"] == marketplace.snapshot
    assert manifest["config"]["users"] == SMALL.users
    ads = pd.read_parquet(out / "ads.parquet")
    assert len(ads) == SMALL.ads
    assert ads["ad_id"].min() == AD_ID_OFFSET + 1
    assert ads["title"].str.len().min() > 5 and ads["description"].str.len().min() > 10
    assert set(ads["status"]) <= {"active", "paused"}
    camps = pd.read_parquet(out / "campaigns.parquet")
    assert (camps["daily_budget"] > 0).all()
    assert set(camps["pacing"]) <= {"even", "asap"}
    assert set(pd.read_parquet(out / "surfaces.parquet")["surface"]) == set(SURFACES)
    truth = pd.read_parquet(out / "truth" / "users.parquet")
    mix = np.stack(truth["interest"].to_numpy())
    assert np.allclose(mix.sum(axis=1), 1.0, atol=1e-4)


def test_ctr_and_cvr_within_configured_ranges(events: pd.DataFrame) -> None:
    imps = events[events.event_type == "impression"]
    clicks = events[events.event_type == "click"]
    convs = events[events.event_type == "conversion"]
    assert imps["true_p_click"].between(SMALL.ctr_min, SMALL.ctr_max).all()
    assert clicks["true_p_conversion"].between(SMALL.cvr_min, SMALL.cvr_max).all()
    ctr = len(clicks) / len(imps)
    cvr = len(convs) / len(clicks)
    assert SMALL.ctr_min <= ctr <= SMALL.ctr_max
    assert SMALL.cvr_min <= cvr <= SMALL.cvr_max
    # The realised CTR agrees with the true probabilities (within 4 binomial std devs).
    expected = imps["true_p_click"].sum()
    assert abs(len(clicks) - expected) < 4 * np.sqrt(expected) + 1


def test_every_surface_and_event_type_occurs(events: pd.DataFrame) -> None:
    assert set(events["surface"]) == set(SURFACES)
    assert set(events["event_type"]) == {"engage", "impression", "click", "conversion"}
    search = events[events.surface == "search"]
    assert search["query"].notna().all() and (search["query"].str.len() > 0).all()
    assert events[events.surface != "search"]["query"].isna().all()
    related = events[events.surface == "related"]
    assert related["context_item_id"].notna().all()
    assert events[events.surface != "related"]["context_item_id"].isna().all()


def test_context_shapes_what_users_do(marketplace: SynthSummary, events: pd.DataFrame) -> None:
    out = marketplace.out_dir
    items = pd.read_parquet(out / "items.parquet").set_index("item_id")["category"]
    eng = events[events.event_type == "engage"]
    cat = items.loc[eng["item_id"].astype(np.int64)].to_numpy()
    # A related session engages mostly within its context item's category.
    rel = eng["surface"].to_numpy() == "related"
    ctx_cat = items.loc[eng.loc[rel, "context_item_id"].astype(np.int64)].to_numpy()
    assert (cat[rel] == ctx_cat).mean() > 0.7
    # A search query names its session's intent: its nouns are the category's.
    from candgen.data.synth_text import CATEGORY_NOUNS

    search = eng["surface"].to_numpy() == "search"
    words = {name: " ".join(n.lower() for n in nouns) for name, nouns in CATEGORY_NOUNS}
    named = [
        any(w in words[c] or w == c for w in q.split())
        for q, c in zip(
            eng.loc[search, "query"], eng.loc[search, "true_intent_category"], strict=True
        )
    ]
    assert np.mean(named) > 0.8
    # Searches wander outside the user's usual mix far more than the home feed does.
    truth = pd.read_parquet(out / "truth" / "users.parquet").set_index("user_id")["interest"]
    cats = json.loads((out / "manifest.json").read_text())["categories"]

    def usual_share(surface: str) -> float:
        part = eng[eng["surface"] == surface]
        mix = np.stack(truth.loc[part["user_id"]].to_numpy())
        idx = pd.Index(cats).get_indexer(part["true_intent_category"])
        return float((mix[np.arange(len(idx)), idx] > 0.05).mean())

    assert usual_share("search") < usual_share("home") - 0.1


def test_conversions_follow_their_click_within_the_window(events: pd.DataFrame) -> None:
    by_id = events.set_index("event_id")
    convs = events[events.event_type == "conversion"]
    assert len(convs) > 0
    click = by_id.loc[convs["caused_by_event_id"].astype(np.int64)]
    assert (click["event_type"] == "click").all()
    assert (click["ad_id"].to_numpy() == convs["ad_id"].to_numpy()).all()
    assert (click["user_id"].to_numpy() == convs["user_id"].to_numpy()).all()
    delay_s = (convs["event_ts"].to_numpy() - click["event_ts"].to_numpy()) / pd.Timedelta(1, "s")
    assert (delay_s > 0).all()
    assert (delay_s <= SMALL.attribution_window_days * 86_400).all()
    # Conversions arrive in the log with a delay, never before they happen.
    assert (convs["arrival_ts"] >= convs["event_ts"]).all()
    clicks = events[events.event_type == "click"]
    imp = by_id.loc[clicks["caused_by_event_id"].astype(np.int64)]
    assert (imp["event_type"] == "impression").all()
    assert (clicks["event_ts"].to_numpy() > imp["event_ts"].to_numpy()).all()
    assert (clicks["ad_id"].to_numpy() == imp["ad_id"].to_numpy()).all()


def test_paused_ads_get_no_impressions_after_their_pause(
    marketplace: SynthSummary, events: pd.DataFrame
) -> None:
    ads = pd.read_parquet(marketplace.out_dir / "ads.parquet").set_index("ad_id")
    imps = events[events.event_type == "impression"]
    paused_at = ads.loc[imps["ad_id"].astype(np.int64), "paused_ts"].to_numpy()
    created = ads.loc[imps["ad_id"].astype(np.int64), "created_ts"].to_numpy()
    ts = imps["event_ts"].to_numpy()
    assert not (pd.notna(paused_at) & (ts >= paused_at)).any()
    assert (ts >= created).all()


def test_interests_show_in_engagements(marketplace: SynthSummary, events: pd.DataFrame) -> None:
    # Organic engagements follow the hidden interest mixture: a user's most engaged category
    # holds about 3.5x its uniform share (1/24) of true interest on average.
    out = marketplace.out_dir
    cats = json.loads((out / "manifest.json").read_text())["categories"]
    items = pd.read_parquet(out / "items.parquet").set_index("item_id")["category"]
    eng = events[events.event_type == "engage"]
    top = (
        eng.assign(cat=items.loc[eng["item_id"].astype(np.int64)].to_numpy())
        .groupby("user_id")["cat"]
        .agg(lambda s: s.value_counts().index[0])
    )
    truth = pd.read_parquet(out / "truth" / "users.parquet").set_index("user_id")["interest"]
    share = [truth[u][cats.index(c)] for u, c in top.items()]
    assert np.mean(share) > 3 / len(cats)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"users": 0}, "users"),
        ({"ads": -3}, "ads"),
        ({"days": 0}, "days"),
        ({"users": 2.5}, "users"),
        ({"seed": -1}, "seed"),
        ({"categories": 99}, "categories"),
        ({"ctr_min": 0.3, "ctr_max": 0.2}, "ctr_min"),
        ({"cvr_max": 1.5}, "cvr_max"),
        ({"surface_mix": (0.5, 0.5, 0.5)}, "surface_mix"),
        ({"start_date": "yesterday"}, "start_date"),
        ({"start_date": "2026-01-01T06:00"}, "start_date"),
        ({"frequency_cap": 0}, "frequency_cap"),
        ({"untargeted_campaign_fraction": 1.5}, "untargeted_campaign_fraction"),
        ({"budget_pressure": 0}, "budget_pressure"),
        ({"chunk_users": 0}, "chunk_users"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        SynthConfig(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_existing_output_is_not_overwritten_silently(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--overwrite"):
        generate(SynthConfig(users=5, ads=5, days=1), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_nothing_arrives_after_the_log_ends(events: pd.DataFrame) -> None:
    end = pd.Timestamp(SMALL.start_date, tz="UTC") + pd.Timedelta(days=SMALL.days)
    assert (events["arrival_ts"] < end).all()
    assert (events["arrival_ts"] >= events["event_ts"]).all()


@pytest.fixture(scope="module")
def impressions(marketplace: SynthSummary, events: pd.DataFrame) -> pd.DataFrame:
    out = marketplace.out_dir
    users = pd.read_parquet(out / "users.parquet")
    campaigns = pd.read_parquet(out / "campaigns.parquet")
    imps = events[events.event_type == "impression"]
    return imps.merge(users, on="user_id").merge(
        campaigns.drop(columns=["advertiser_id"]), on="campaign_id"
    )


def test_impressions_reach_only_targeted_users_and_surfaces(impressions: pd.DataFrame) -> None:
    targeted = 0
    for column, target in (
        ("country", "target_countries"),
        ("age_bucket", "target_age_buckets"),
        ("device", "target_devices"),
        ("surface", "target_surfaces"),
    ):
        lists = impressions[target].to_numpy()
        values = impressions[column].to_numpy()
        allowed = np.array([len(t) == 0 or v in t for v, t in zip(values, lists, strict=True)])
        assert allowed.all(), f"{column}: {int((~allowed).sum())} impressions outside targeting"
        targeted += sum(len(t) > 0 for t in lists)
    assert targeted > 0  # the check above had targeted campaigns to hold to


def test_targeting_leaves_a_typical_user_30_to_70_percent_of_ads(
    marketplace: SynthSummary,
) -> None:
    out = marketplace.out_dir
    campaigns = pd.read_parquet(out / "campaigns.parquet")
    ads = pd.read_parquet(out / "ads.parquet").merge(campaigns, on="campaign_id")
    users = pd.read_parquet(out / "users.parquet")
    eligible = []
    for user in users.head(50).itertuples():
        ok = np.ones(len(ads), bool)
        for value, target in (
            (user.country, "target_countries"),
            (user.age_bucket, "target_age_buckets"),
            (user.device, "target_devices"),
        ):
            ok &= np.array([len(t) == 0 or value in t for t in ads[target]])
        eligible.append(ok.mean())
    assert 0.3 <= float(np.median(eligible)) <= 0.7


def test_hidden_advertisers_get_no_impressions_after_hiding(
    marketplace: SynthSummary, events: pd.DataFrame
) -> None:
    hidden = pd.read_parquet(marketplace.out_dir / "hidden_advertisers.parquet")
    assert len(hidden) > 0
    assert not hidden.duplicated(["user_id", "advertiser_id"]).any()
    imps = events[events.event_type == "impression"].merge(hidden, on=["user_id", "advertiser_id"])
    assert not (imps["event_ts"] >= imps["hidden_ts"]).any()


def test_frequency_caps_hold_per_user_and_day(events: pd.DataFrame) -> None:
    imps = events[events.event_type == "impression"]
    per_ad = imps.groupby(["user_id", "ad_id", "day"]).size()
    per_advertiser = imps.groupby(["user_id", "advertiser_id", "day"]).size()
    assert per_ad.max() <= SMALL.frequency_cap
    assert per_advertiser.max() <= SMALL.advertiser_frequency_cap
    assert per_ad.max() > 1  # the cap, not chance, is what held it


def test_no_impression_after_the_day_plan_exhausts_a_campaign(
    marketplace: SynthSummary, events: pd.DataFrame
) -> None:
    out = marketplace.out_dir
    plan = pd.read_parquet(out / "delivery_plan.parquet")
    campaigns = pd.read_parquet(out / "campaigns.parquet")
    assert len(plan) == len(campaigns) * SMALL.days
    assert plan["throttle"].between(0, 1).all()
    assert (plan["throttle"] < 1).any() and plan["exhausted_ts"].notna().any()
    start = pd.Timestamp(SMALL.start_date, tz="UTC")
    imps = events[events.event_type == "impression"].assign(
        day_ts=lambda d: start + pd.to_timedelta(d["day"].astype(int), unit="D")
    )
    joined = imps.merge(plan, on=["campaign_id", "day_ts"])
    assert len(joined) == len(imps)
    assert not (joined["event_ts"] >= joined["exhausted_ts"]).any()
    budgets = campaigns["daily_budget"]
    assert (budgets >= campaigns["cpc_bid"]).all()
