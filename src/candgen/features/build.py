"""Batch feature computation: turns a synthetic marketplace into the offline feature tables that
the Feast feature views in feature_repo/ read.

Every row is stamped with the time its value became known (for engagement sequences, the
arrival time of the newest event it contains), so Feast's point-in-time join never hands a label
a value that was computed from later events.

Tables written to ``out_dir`` (names match the feature views)::

    user_profile  user_short_term  user_long_term  ad_attributes  ad_delivery
    advertiser_profile   query_embedding (the log's search queries, embedded)   manifest.json
    campaign_delivery (targeting, budget, pacing, status)   delivery_shard (what serving watches)
    user_ad_impressions (the day's counts, for frequency caps)   user_hidden_advertisers
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from candgen.data.synth import AD_ID_OFFSET, snapshot_hash
from candgen.data.targeting import TARGET_COLUMNS, targeting_masks
from candgen.errors import CandgenError, ConfigError
from candgen.features.text import EMBEDDING_DIM, MODEL_NAME, TextEmbedder, ad_texts
from candgen.vocab import DELIVERY_SHARDS, LONG_TERM_TABLE, QUERY_TABLE

TS: Final = pa.timestamp("us", tz="UTC")
SEQUENCE_EVENT_TYPES: Final = ("engage", "click", "conversion")
# The users' long-term embeddings: written empty here, filled by the long-term summariser
# (`candgen features long-term`), so that every feature view always has its source table.
FEATURE_TABLES: Final = (
    "user_profile",
    "user_short_term",
    "user_long_term",
    LONG_TERM_TABLE,
    "ad_attributes",
    "ad_delivery",
    "advertiser_profile",
    "campaign_delivery",
    "delivery_shard",
    "user_ad_impressions",
    "user_hidden_advertisers",
)
# What the features' snapshot hash covers: the feature views' tables and the query embeddings.
SNAPSHOT_TABLES: Final = (*FEATURE_TABLES, QUERY_TABLE)
LONG_TERM_SCHEMA: Final = pa.schema(
    [
        ("user_id", pa.int64()),
        ("event_timestamp", TS),
        ("long_term_embedding", pa.list_(pa.float32())),
    ]
)


@dataclass(frozen=True)
class FeatureBuildConfig:
    """How offline features are computed. CLI flags map 1:1 onto these fields.

    Args:
        short_seq_len: length of the short-term engagement sequence (newest last).
        long_seq_len: length of the long-term engagement sequence.
        delivery_window_days: trailing window for an ad's impressions, clicks, CTR and CVR.
        embed_text: compute the ad text embedding with the small language model.
        text_batch_size: texts per language-model forward pass.
    """

    short_seq_len: int = 20
    long_seq_len: int = 200
    delivery_window_days: int = 7
    embed_text: bool = True
    text_batch_size: int = 128

    def __post_init__(self) -> None:
        for name, lo, hi in (
            ("short_seq_len", 1, 1_000),
            ("long_seq_len", 1, 10_000),
            ("delivery_window_days", 1, 365),
            ("text_batch_size", 1, 100_000),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(name, f"must be a whole number from {lo} to {hi}, got {v!r}")
        if self.long_seq_len < self.short_seq_len:
            raise ConfigError("long_seq_len", "must be at least short_seq_len")


def _read_manifest(data_dir: Path) -> dict[str, Any]:
    path = data_dir / "manifest.json"
    if not path.exists():
        raise CandgenError(
            f"{data_dir}: not a candgen marketplace (no manifest.json); "
            "create one with `candgen data synth`"
        )
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def _epoch_us(ts: pd.Series) -> np.ndarray:
    """Microseconds since the epoch of a tz-aware timestamp column."""
    us: np.ndarray = ts.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[us]")
    return us.astype(np.int64)


def _tail_lists(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, n: int) -> pa.ListArray:
    """For each [lo, hi) slice of ``values``, the last ``n`` entries as a list, oldest first."""
    start = np.maximum(lo, hi - n)
    lengths = hi - start
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    idx = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[idx]))


def _user_sequences(
    events: pd.DataFrame,
    category_of: dict[str, np.ndarray],
    n_categories: int,
    cfg: FeatureBuildConfig,
) -> tuple[pa.Table, pa.Table]:
    """Short- and long-term engagement snapshots, one per user per day with new engagements."""
    ev = events[events["event_type"].isin(SEQUENCE_EVENT_TYPES)]
    ids = np.where(ev["item_id"].notna(), ev["item_id"], ev["ad_id"]).astype(np.int64)
    arrival = _epoch_us(ev["arrival_ts"])
    user = ev["user_id"].to_numpy(np.int64)
    order = np.lexsort((arrival, user))
    user, ids, arrival = user[order], ids[order], arrival[order]
    actions = ev["action_type"].to_numpy(object)[order]
    surfaces = ev["surface"].to_numpy(object)[order]
    etype = ev["event_type"].to_numpy(object)[order]
    day = arrival // (86_400 * 10**6)
    n = len(user)
    if n == 0:
        raise CandgenError("events: no engagements, clicks or conversions to build sequences from")
    new_user = np.r_[True, user[1:] != user[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    # The last event of each (user, arrival day) closes one snapshot.
    last_of_day = np.r_[(user[1:] != user[:-1]) | (day[1:] != day[:-1]), True]
    end = np.flatnonzero(last_of_day) + 1
    lo = user_start[end - 1]
    snap_user = user[end - 1]
    snap_ts = pa.array(arrival[end - 1], type=TS)
    short = pa.table(
        {
            "user_id": snap_user,
            "event_timestamp": snap_ts,
            "recent_item_ids": _tail_lists(ids, lo, end, cfg.short_seq_len),
            "recent_action_types": _tail_lists(actions, lo, end, cfg.short_seq_len),
            "recent_surfaces": _tail_lists(surfaces, lo, end, cfg.short_seq_len),
            "recent_timestamps": _tail_lists(arrival // 10**6, lo, end, cfg.short_seq_len),
        }
    )
    is_item = ids < AD_ID_OFFSET
    cat = np.where(
        is_item,
        category_of["item"][np.where(is_item, ids - 1, 0)],
        category_of["ad"][np.where(is_item, 0, ids - AD_ID_OFFSET - 1)],
    )

    def cumulative_at_end(mask: np.ndarray) -> np.ndarray:
        csum = np.cumsum(mask, dtype=np.int64)
        before = np.where(lo > 0, csum[np.maximum(lo - 1, 0)], 0)
        return csum[end - 1] - before

    hist = np.stack([cumulative_at_end(cat == c) for c in range(n_categories)], axis=1)
    affinity = (hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)).astype(np.float32)
    long = pa.table(
        {
            "user_id": snap_user,
            "event_timestamp": snap_ts,
            "long_item_ids": _tail_lists(ids, lo, end, cfg.long_seq_len),
            "category_affinity": pa.FixedSizeListArray.from_arrays(
                pa.array(affinity.ravel()), n_categories
            ).cast(pa.list_(pa.float32())),
            "engagements_total": cumulative_at_end(etype == "engage"),
            "ad_clicks_total": cumulative_at_end(etype == "click"),
            "conversions_total": cumulative_at_end(etype == "conversion"),
        }
    )
    return short, long


def _ad_delivery(
    events: pd.DataFrame,
    ads: pd.DataFrame,
    campaigns: pd.DataFrame,
    manifest: dict[str, Any],
    cfg: FeatureBuildConfig,
) -> pa.Table:
    """Ad delivery state: one row at creation, one at a pause, one per day with traffic (the
    budget left of that day's)."""
    days = int(manifest["config"]["days"])
    start = pd.Timestamp(manifest["config"]["start_date"], tz="UTC")
    n_ads = len(ads)
    ad_ev = events[events["event_type"].isin(("impression", "click", "conversion"))]
    ad_idx = ad_ev["ad_id"].to_numpy(np.int64) - AD_ID_OFFSET - 1
    # A conversion counts from the day it arrives: that is when the delivery system learns of it.
    ev_day = ((ad_ev["arrival_ts"] - start).dt.total_seconds() // 86_400).to_numpy(np.int64)
    in_range = ev_day < days
    counts = {}
    for kind in ("impression", "click", "conversion"):
        m = (ad_ev["event_type"].to_numpy(object) == kind) & in_range
        grid = np.zeros((n_ads, days), np.int32)
        np.add.at(grid, (ad_idx[m], ev_day[m]), 1)
        counts[kind] = grid

    def trailing(grid: np.ndarray) -> np.ndarray:
        c = np.cumsum(grid, axis=1)
        shifted = np.zeros_like(c)
        w = cfg.delivery_window_days
        shifted[:, w:] = c[:, :-w]
        trailing_sum: np.ndarray = c - shifted
        return trailing_sum

    imp, clk, conv = (trailing(counts[k]) for k in ("impression", "click", "conversion"))
    # The day's spend per campaign, from clicks at the bid, against the daily budget.
    camp_idx = ads["campaign_id"].to_numpy(np.int64) - 1
    cpc = campaigns["cpc_bid"].to_numpy(np.float64)
    camp_spend = np.zeros((len(campaigns), days))
    np.add.at(camp_spend, camp_idx, counts["click"] * cpc[camp_idx][:, None])
    daily_budget = campaigns["daily_budget"].to_numpy(np.float64)
    remaining = np.maximum(daily_budget[:, None] - camp_spend, 0.0)[camp_idx]
    paused_ts = ads["paused_ts"]
    pause_day = np.where(
        paused_ts.notna(),
        ((paused_ts - start).dt.total_seconds() // 86_400).fillna(days).to_numpy(),
        days,
    ).astype(np.int64)
    day_grid = np.arange(days)[None, :]
    # A day's row is stamped at its end, when a daily budget starts afresh: exhaustion is the
    # campaign's state within a day (campaign_delivery), never carried into the next.
    status = np.where(pause_day[:, None] <= day_grid, "paused", "active")
    a_idx, d_idx = np.nonzero(imp > 0)
    day_end_us = (int(start.timestamp() * 10**6) + (d_idx + 1) * 86_400 * 10**6 - 1).astype(
        np.int64
    )

    def rate(num: np.ndarray, den: np.ndarray, prior: float) -> np.ndarray:
        # Smoothed so that a handful of impressions does not give a CTR of 0 or 1.
        smoothed: np.ndarray = (num + prior * 20) / (den + 20)
        return smoothed.astype(np.float32)

    ids = ads["ad_id"].to_numpy(np.int64)
    created_us = _epoch_us(ads["created_ts"])
    budget = daily_budget[camp_idx]
    start_us = int(start.timestamp() * 10**6)
    created_day = (created_us - start_us) // (86_400 * 10**6)
    creation = pd.DataFrame(
        {
            "ad_id": ids,
            "event_timestamp": created_us,
            "status": np.where(pause_day <= created_day, "paused", "active"),
            "budget_remaining": budget.astype(np.float32),
            "impressions_7d": np.zeros(n_ads, np.int64),
            "clicks_7d": np.zeros(n_ads, np.int64),
            "conversions_7d": np.zeros(n_ads, np.int64),
            "ctr_7d": rate(np.zeros(n_ads), np.zeros(n_ads), 0.01),
            "cvr_7d": rate(np.zeros(n_ads), np.zeros(n_ads), 0.1),
        }
    )
    daily = pd.DataFrame(
        {
            "ad_id": ids[a_idx],
            "event_timestamp": day_end_us,
            "status": status[a_idx, d_idx],
            "budget_remaining": remaining[a_idx, d_idx].astype(np.float32),
            "impressions_7d": imp[a_idx, d_idx].astype(np.int64),
            "clicks_7d": clk[a_idx, d_idx].astype(np.int64),
            "conversions_7d": conv[a_idx, d_idx].astype(np.int64),
            "ctr_7d": rate(clk[a_idx, d_idx], imp[a_idx, d_idx], 0.01),
            "cvr_7d": rate(conv[a_idx, d_idx], clk[a_idx, d_idx], 0.1),
        }
    )
    # A pause during the log gets its own row, stamped when it happened.
    p_idx = np.flatnonzero((pause_day >= 0) & (pause_day < days) & (pause_day > created_day))
    prev = np.maximum(pause_day[p_idx] - 1, 0)
    seen = (pause_day[p_idx] > 0).astype(np.int64)
    pauses = pd.DataFrame(
        {
            "ad_id": ids[p_idx],
            "event_timestamp": _epoch_us(paused_ts.iloc[p_idx]),
            "status": "paused",
            "budget_remaining": remaining[p_idx, prev].astype(np.float32),
            "impressions_7d": imp[p_idx, prev].astype(np.int64) * seen,
            "clicks_7d": clk[p_idx, prev].astype(np.int64) * seen,
            "conversions_7d": conv[p_idx, prev].astype(np.int64) * seen,
            "ctr_7d": rate(clk[p_idx, prev] * seen, imp[p_idx, prev] * seen, 0.01),
            "cvr_7d": rate(conv[p_idx, prev] * seen, clk[p_idx, prev] * seen, 0.1),
        }
    )
    out = pd.concat([creation, daily, pauses], ignore_index=True).sort_values(
        ["ad_id", "event_timestamp"], kind="stable"
    )
    table = pa.Table.from_pandas(out, preserve_index=False)
    return table.set_column(
        1, "event_timestamp", pa.array(out["event_timestamp"].to_numpy(), type=TS)
    )


def campaign_delivery_table(
    campaigns: pd.DataFrame, plan: pd.DataFrame, manifest: dict[str, Any]
) -> pd.DataFrame:
    """Campaign delivery state (targeting, budget, pacing, status, throttle): a row when a
    campaign that began before the log starts it, at the start of each day it runs (the day's
    throttle), when the day's plan exhausts its budget, and when it is paused."""
    days = int(manifest["config"]["days"])
    start = pd.Timestamp(manifest["config"]["start_date"], tz="UTC")
    n = len(campaigns)
    ids = campaigns["campaign_id"].to_numpy(np.int64)
    check_campaign_targeting(campaigns)
    begin_us = _epoch_us(campaigns["start_ts"])
    start_us = int(start.timestamp() * 10**6)
    day_us = 86_400 * 10**6
    paused = campaigns["paused_ts"]
    pause_us = np.where(paused.notna(), _epoch_us(paused.fillna(start)), np.iinfo(np.int64).max)
    throttle = np.ones((n, days), np.float32)
    exhausted_us = np.full((n, days), -1, np.int64)
    row = plan["campaign_id"].to_numpy(np.int64) - 1
    day = ((plan["day_ts"] - start).dt.total_seconds() // 86_400).to_numpy(np.int64)
    throttle[row, day] = plan["throttle"].to_numpy(np.float32)
    has = plan["exhausted_ts"].notna().to_numpy()
    exhausted_us[row[has], day[has]] = _epoch_us(plan["exhausted_ts"][has])

    frames = []

    def rows(idx: np.ndarray, ts: np.ndarray, status: np.ndarray, thr: np.ndarray) -> None:
        frames.append(
            pd.DataFrame(
                {"campaign_id": ids[idx], "event_timestamp": ts, "status": status, "throttle": thr}
            )
        )

    before = np.flatnonzero(begin_us < start_us)
    rows(
        before,
        begin_us[before],
        np.where(pause_us[before] <= begin_us[before], "paused", "active"),
        np.ones(len(before), np.float32),
    )
    c_idx, d_idx = np.nonzero(begin_us[:, None] <= start_us + np.arange(days) * day_us)
    at = start_us + d_idx * day_us
    rows(c_idx, at, np.where(pause_us[c_idx] <= at, "paused", "active"), throttle[c_idx, d_idx])
    c_idx, d_idx = np.nonzero(exhausted_us >= 0)
    at = exhausted_us[c_idx, d_idx]
    live = (pause_us[c_idx] > at) & (begin_us[c_idx] <= at)
    rows(c_idx[live], at[live], np.full(int(live.sum()), "exhausted"), throttle[c_idx, d_idx][live])
    p_idx = np.flatnonzero((pause_us >= begin_us) & (pause_us < start_us + days * day_us))
    p_day = np.clip((pause_us[p_idx] - start_us) // day_us, 0, days - 1)
    rows(p_idx, pause_us[p_idx], np.full(len(p_idx), "paused"), throttle[p_idx, p_day])
    out = pd.concat(frames, ignore_index=True)
    # A pause at a day's start meets that day's row: the pause, listed last, wins.
    out = out.drop_duplicates(["campaign_id", "event_timestamp"], keep="last")
    out = out.sort_values(["campaign_id", "event_timestamp"], kind="stable", ignore_index=True)
    fixed = campaigns.set_index("campaign_id").loc[
        out["campaign_id"], ["daily_budget", "pacing", *TARGET_COLUMNS]
    ]
    for column in fixed.columns:
        out[column] = fixed[column].to_numpy()
    out["daily_budget"] = out["daily_budget"].astype(np.float32)
    return out


def check_campaign_targeting(campaigns: pd.DataFrame) -> np.ndarray:
    """The campaigns' targeting masks; refuses a malformed targeting list, naming the campaign
    and the field."""
    missing = [c for c in TARGET_COLUMNS if c not in campaigns.columns]
    if missing:
        raise ConfigError(
            missing[0], "campaigns.parquet lacks this targeting column (regenerate the data)"
        )
    return targeting_masks(
        {c: campaigns[c].to_numpy(object) for c in TARGET_COLUMNS},
        campaigns["campaign_id"].to_numpy(np.int64),
    )


def _user_ad_impressions(events: pd.DataFrame) -> pa.Table:
    """Each user's impressions of the day so far per ad and per advertiser (the frequency caps'
    counts): a row per user and day, stamped at the day's last impression."""
    imps = events[events["event_type"] == "impression"]
    day = imps["arrival_ts"].dt.strftime("%Y-%m-%d").to_numpy(object)
    frame = pd.DataFrame(
        {
            "user_id": imps["user_id"].to_numpy(np.int64),
            "day": day,
            "ad_id": imps["ad_id"].to_numpy(np.int64),
            "advertiser_id": imps["advertiser_id"].to_numpy(np.int64),
            "ts": _epoch_us(imps["arrival_ts"]),
        }
    )
    keys = ["user_id", "day"]
    last = frame.groupby(keys, sort=True)["ts"].max()

    def counted(entity: str) -> tuple[pd.Series, pd.Series]:
        per = frame.groupby([*keys, entity], sort=True).size().reset_index(name="n")
        grouped = per.groupby(keys, sort=True)
        return grouped[entity].agg(list), grouped["n"].agg(list)

    ad_ids, ad_counts = counted("ad_id")
    adv_ids, adv_counts = counted("advertiser_id")
    return pa.table(
        {
            "user_id": last.index.get_level_values(0).to_numpy(np.int64),
            "event_timestamp": pa.array(last.to_numpy(), type=TS),
            "impression_day": pa.array(last.index.get_level_values(1).to_numpy(object)),
            "impressed_ad_ids": pa.array(ad_ids.tolist(), type=pa.list_(pa.int64())),
            "ad_impression_counts": pa.array(ad_counts.tolist(), type=pa.list_(pa.int64())),
            "impressed_advertiser_ids": pa.array(adv_ids.tolist(), type=pa.list_(pa.int64())),
            "advertiser_impression_counts": pa.array(
                adv_counts.tolist(), type=pa.list_(pa.int64())
            ),
        }
    )


def _user_hidden_advertisers(hidden: pd.DataFrame) -> pa.Table:
    """The advertisers each user has hidden: a row per hide, with every advertiser hidden so
    far."""
    hidden = hidden.sort_values(["user_id", "hidden_ts", "advertiser_id"], kind="stable")
    so_far: list[list[int]] = []
    current: list[int] = []
    previous = None
    for user, advertiser in zip(hidden["user_id"], hidden["advertiser_id"], strict=True):
        if user != previous:
            current, previous = [], user
        current = [*current, int(advertiser)]
        so_far.append(current)
    return pa.table(
        {
            "user_id": hidden["user_id"].to_numpy(np.int64),
            "event_timestamp": pa.array(hidden["hidden_ts"], type=TS),
            "hidden_advertiser_ids": pa.array(so_far, type=pa.list_(pa.int64())),
        }
    )


def _delivery_shards(campaign_delivery: pd.DataFrame) -> pa.Table:
    """The live delivery state that serving watches, as it stands at the end of the log: per
    shard (``campaign_id % DELIVERY_SHARDS``) the campaigns not simply active (paused,
    exhausted or throttled), with their targeting masks (from the table's own targeting, which
    ``campaign_delivery_table`` has already checked: only the listed campaigns are encoded)."""
    last = campaign_delivery.groupby("campaign_id").last()
    special = last[(last["status"] != "active") | (last["throttle"] < 1.0)]
    masks = pd.Series(check_campaign_targeting(special.reset_index()), index=special.index)
    ids = special.index.to_numpy(np.int64)
    shard = ids % DELIVERY_SHARDS
    stamp = int(campaign_delivery["event_timestamp"].max())
    out = []
    for s in range(DELIVERY_SHARDS):
        mine = shard == s
        out.append(
            {
                "delivery_shard_id": s,
                "event_timestamp": stamp,
                "campaign_ids": ids[mine].tolist(),
                "statuses": special["status"].to_numpy(object)[mine].tolist(),
                "throttles": special["throttle"].to_numpy(np.float32)[mine].tolist(),
                "targeting_masks": masks.loc[ids[mine]].to_numpy(np.int64).tolist(),
                "version": stamp // 1_000,  # milliseconds, as pushes number them
            }
        )
    frame = pd.DataFrame(out)
    return pa.table(
        {
            "delivery_shard_id": frame["delivery_shard_id"].to_numpy(np.int64),
            "event_timestamp": pa.array(frame["event_timestamp"].to_numpy(np.int64), type=TS),
            "campaign_ids": pa.array(frame["campaign_ids"], type=pa.list_(pa.int64())),
            "statuses": pa.array(frame["statuses"], type=pa.list_(pa.string())),
            "throttles": pa.array(frame["throttles"], type=pa.list_(pa.float32())),
            "targeting_masks": pa.array(frame["targeting_masks"], type=pa.list_(pa.int64())),
            "version": frame["version"].to_numpy(np.int64),
        }
    )


def build_features(
    data_dir: Path | str,
    out_dir: Path | str,
    config: FeatureBuildConfig = FeatureBuildConfig(),
    text_cache: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Computes every offline feature table from a marketplace written by ``candgen data synth``.

    Args:
        data_dir: the marketplace folder.
        out_dir: where the feature tables go (created; existing tables are replaced).
        config: sequence lengths, windows and text embedding settings.
        text_cache: parquet cache of text embeddings (default: ``out_dir/text_cache.parquet``).
        progress: show progress bars.

    Returns:
        The manifest written to ``out_dir/manifest.json``: row counts, the source snapshot, the
        end of the data's clock, and the hash of the feature tables.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    manifest = _read_manifest(data_dir)
    n_categories = len(manifest["categories"])
    out_dir.mkdir(parents=True, exist_ok=True)
    users = pd.read_parquet(data_dir / "users.parquet")
    ads = pd.read_parquet(data_dir / "ads.parquet")
    items = pd.read_parquet(data_dir / "items.parquet")
    campaigns = pd.read_parquet(data_dir / "campaigns.parquet")
    advertisers = pd.read_parquet(data_dir / "advertisers.parquet")
    events = pd.read_parquet(
        data_dir / "events",
        columns=[
            "user_id",
            "arrival_ts",
            "surface",
            "event_type",
            "action_type",
            "item_id",
            "ad_id",
            "advertiser_id",
            "query",
        ],
    )
    cat_index = {name: i for i, name in enumerate(manifest["categories"])}
    category_of = {
        "item": items["category"].map(cat_index).to_numpy(np.int64),
        "ad": ads["category"].map(cat_index).to_numpy(np.int64),
    }
    tables: dict[str, pa.Table] = {}
    tables["user_profile"] = pa.table(
        {
            "user_id": users["user_id"].to_numpy(np.int64),
            "event_timestamp": pa.array(users["signup_ts"], type=TS),
            "age_bucket": users["age_bucket"].to_numpy(object),
            "country": users["country"].to_numpy(object),
            "device": users["device"].to_numpy(object),
        }
    )
    tables["user_short_term"], tables["user_long_term"] = _user_sequences(
        events, category_of, n_categories, config
    )
    texts = ad_texts(ads["title"], ads["description"])
    queries = sorted(set(events["query"].dropna()))
    if config.embed_text:
        embedder = TextEmbedder(
            text_cache or out_dir / "text_cache.parquet",
            batch_size=config.text_batch_size,
            progress=progress,
        )
        emb = embedder.embed(texts)
        query_emb = embedder.embed(queries, what="search queries")
    else:
        emb = np.zeros((len(texts), EMBEDDING_DIM), np.float32)
        query_emb = np.zeros((0, EMBEDDING_DIM), np.float32)
        queries = []
    tables["ad_attributes"] = pa.table(
        {
            "ad_id": ads["ad_id"].to_numpy(np.int64),
            "event_timestamp": pa.array(ads["created_ts"], type=TS),
            "advertiser_id": ads["advertiser_id"].to_numpy(np.int64),
            "campaign_id": ads["campaign_id"].to_numpy(np.int64),
            "category": ads["category"].to_numpy(object),
            "price": ads["price"].to_numpy(np.float32),
            "title": ads["title"].to_numpy(object),
            "text_embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(emb.ravel()), EMBEDDING_DIM
            ).cast(pa.list_(pa.float32())),
        }
    )
    tables[LONG_TERM_TABLE] = LONG_TERM_SCHEMA.empty_table()
    for name in ("delivery_plan", "hidden_advertisers"):
        if not (data_dir / f"{name}.parquet").exists():
            raise CandgenError(
                f"{data_dir}: no {name}.parquet (a marketplace from before delivery "
                "constraints); regenerate it with `candgen data synth`"
            )
    plan = pd.read_parquet(data_dir / "delivery_plan.parquet")
    tables["ad_delivery"] = _ad_delivery(events, ads, campaigns, manifest, config)
    campaign_delivery = campaign_delivery_table(campaigns, plan, manifest)
    tables["campaign_delivery"] = pa.Table.from_pandas(
        campaign_delivery, preserve_index=False
    ).set_column(1, "event_timestamp", pa.array(campaign_delivery["event_timestamp"], type=TS))
    tables["delivery_shard"] = _delivery_shards(campaign_delivery)
    tables["user_ad_impressions"] = _user_ad_impressions(events)
    tables["user_hidden_advertisers"] = _user_hidden_advertisers(
        pd.read_parquet(data_dir / "hidden_advertisers.parquet")
    )
    tables["advertiser_profile"] = pa.table(
        {
            "advertiser_id": advertisers["advertiser_id"].to_numpy(np.int64),
            "event_timestamp": pa.array(advertisers["created_ts"], type=TS),
            "vertical": advertisers["vertical"].to_numpy(object),
            "daily_budget": advertisers["daily_budget"].to_numpy(np.float32),
            "status": advertisers["status"].to_numpy(object),
        }
    )
    tables[QUERY_TABLE] = pa.table(
        {
            "query": pa.array(queries, type=pa.string()),
            "text_embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(query_emb.ravel(), type=pa.float32()), EMBEDDING_DIM
            ).cast(pa.list_(pa.float32())),
        }
    )
    for name, table in tables.items():
        pq.write_table(table, out_dir / f"{name}.parquet", compression="zstd")
    end = pd.Timestamp(manifest["config"]["start_date"], tz="UTC") + timedelta(
        days=int(manifest["config"]["days"])
    )
    feature_manifest = {
        "kind": "candgen.feature_tables",
        "source_snapshot": manifest["snapshot"],
        "config": dataclasses.asdict(config),
        "text_model": MODEL_NAME if config.embed_text else None,
        "data_start": min(
            pd.Timestamp(t.column("event_timestamp").combine_chunks().to_pandas().min())
            for t in tables.values()
            if t.num_rows and "event_timestamp" in t.column_names
        ).isoformat(),
        "data_end": end.isoformat(),
        "rows": {name: t.num_rows for name, t in tables.items()},
        # The order of category_affinity's entries (serving maps ad categories onto it).
        "categories": list(manifest["categories"]),
        "snapshot": snapshot_hash(out_dir, SNAPSHOT_TABLES),
    }
    (out_dir / "manifest.json").write_text(json.dumps(feature_manifest, indent=2) + "\n")
    return feature_manifest
