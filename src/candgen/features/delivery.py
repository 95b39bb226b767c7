"""Live delivery state through Feast pushes: campaign changes, impressions, hidden advertisers.

A campaign change (paused, resumed, out of budget, throttled, retargeted) is pushed to the
``campaign_delivery`` view, the campaign's own record, and to its ``delivery_shard`` row, which
is what serving watches: the generators step polls the shards' versions and rereads a shard whose
version moved, so a pause reaches the served answers within one poll. Once listed in its shard a
campaign stays listed (a resumed campaign is listed as active), since the served export may
still hold its older state.

Each push reads the current online row, changes it and writes it back whole. Two writers of one
shard at once could lose an update, so one process (the delivery controller) owns the campaign
pushes; impressions and hides are per user, written by whoever logs them. A campaign change is
two pushes (the record, then the shard): should the second fail, push the change again.

Every update is validated before anything is written; a bad one names the campaign (or user) and
the field.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import pandas as pd

from candgen.data.synth import PACING_MODES
from candgen.data.targeting import TARGET_COLUMNS, targeting_mask
from candgen.errors import ConfigError
from candgen.vocab import DELIVERY_SHARDS

if TYPE_CHECKING:
    from feast import FeatureStore

CAMPAIGN_VIEW: Final = "campaign_delivery"
SHARD_VIEW: Final = "delivery_shard"
IMPRESSIONS_VIEW: Final = "user_ad_impressions"
HIDDEN_VIEW: Final = "user_hidden_advertisers"
STATUSES: Final = ("active", "paused", "exhausted")
CAMPAIGN_FIELDS: Final = (
    "status",
    "throttle",
    "daily_budget",
    "pacing",
    *TARGET_COLUMNS,
)
SHARD_FIELDS: Final = ("campaign_ids", "statuses", "throttles", "targeting_masks", "version")
IMPRESSION_FIELDS: Final = (
    "impression_day",
    "impressed_ad_ids",
    "ad_impression_counts",
    "impressed_advertiser_ids",
    "advertiser_impression_counts",
)


def _positive_id(name: str, value: object, owner: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(name, f"{owner}must be a positive integer id, got {value!r}")
    return value


def _aware(name: str, value: object, owner: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ConfigError(name, f"{owner}must be a timezone-aware datetime, got {value!r}")
    return value


@dataclass(frozen=True)
class CampaignUpdate:
    """A change to one campaign's delivery state; fields left None keep their value.

    Args:
        campaign_id: the campaign.
        status: active, paused or exhausted.
        throttle: the share of requests the campaign takes part in, in [0, 1] (pacing).
        daily_budget: the day's budget, > 0.
        pacing: even or asap.
        targeting: new targeting lists, keyed by ``TARGET_COLUMNS`` (an empty list: everyone);
            the columns it leaves out keep their value.
        timestamp: when the change happened (default: now).
    """

    campaign_id: int
    status: str | None = None
    throttle: float | None = None
    daily_budget: float | None = None
    pacing: str | None = None
    targeting: dict[str, list[str]] | None = None
    timestamp: datetime | None = None

    def __post_init__(self) -> None:
        cid = _positive_id("campaign_id", self.campaign_id)
        owner = f"campaign {cid}: "
        if self.status is not None and self.status not in STATUSES:
            raise ConfigError("status", f"{owner}must be one of {STATUSES}, got {self.status!r}")
        if self.pacing is not None and self.pacing not in PACING_MODES:
            raise ConfigError(
                "pacing", f"{owner}must be one of {PACING_MODES}, got {self.pacing!r}"
            )
        for name, lo, hi in (("throttle", 0.0, 1.0), ("daily_budget", 0.0, math.inf)):
            v = getattr(self, name)
            if v is None:
                continue
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or not lo <= v <= hi or (name == "daily_budget" and v <= 0):
                bound = "in [0, 1]" if name == "throttle" else "a positive amount"
                raise ConfigError(name, f"{owner}must be {bound}, got {v!r}")
        if self.targeting is not None:
            if not isinstance(self.targeting, dict):
                raise ConfigError("targeting", f"{owner}must be a mapping of targeting lists")
            unknown = sorted(set(self.targeting) - set(TARGET_COLUMNS))
            if unknown:
                raise ConfigError(
                    "targeting", f"{owner}unknown field(s) {unknown}; expected {TARGET_COLUMNS}"
                )
            targeting_mask(self.targeting, cid)
        if self.timestamp is not None:
            _aware("timestamp", self.timestamp, owner)


def _now() -> datetime:
    return datetime.now(UTC)


def _read(store: FeatureStore, view: str, fields: Sequence[str], key: str, ids: list[int]) -> Any:
    return store.get_online_features(
        features=[f"{view}:{f}" for f in fields], entity_rows=[{key: i} for i in ids]
    ).to_dict()


def _push(store: FeatureStore, source: str, rows: list[dict[str, Any]]) -> None:
    from feast.data_source import PushMode

    store.push(source, pd.DataFrame(rows), to=PushMode.ONLINE)


def push_campaign_updates(
    store: FeatureStore, updates: Sequence[CampaignUpdate]
) -> dict[str, list[int]]:
    """Applies campaign changes to the online store: the campaigns' records, then their shards.

    Returns:
        The campaigns changed and the shards rewritten.

    Raises:
        ConfigError: an update for a campaign the online store does not know (naming it), or a
            campaign updated twice in one call. Nothing is written then.
    """
    ids = [u.campaign_id for u in updates]
    if len(set(ids)) != len(ids):
        raise ConfigError("campaign_id", "each campaign may appear once per push")
    if not updates:
        return {"campaigns": [], "shards": []}
    current = _read(store, CAMPAIGN_VIEW, CAMPAIGN_FIELDS, "campaign_id", ids)
    rows = []
    for i, u in enumerate(updates):
        if current["status"][i] is None:
            raise ConfigError(
                "campaign_id",
                f"campaign {u.campaign_id}: unknown to the online store "
                "(materialize the features first)",
            )
        row = {f: current[f][i] for f in CAMPAIGN_FIELDS}
        for name in ("status", "throttle", "daily_budget", "pacing"):
            if getattr(u, name) is not None:
                row[name] = getattr(u, name)
        row.update({k: list(v) for k, v in (u.targeting or {}).items()})
        row = {k: list(v) if k in TARGET_COLUMNS else v for k, v in row.items()}
        rows.append({"campaign_id": u.campaign_id, "event_timestamp": u.timestamp or _now(), **row})
    shards = sorted({cid % DELIVERY_SHARDS for cid in ids})
    state = _read(store, SHARD_VIEW, SHARD_FIELDS, "delivery_shard_id", shards)
    shard_rows = []
    for j, shard in enumerate(shards):
        entries = {
            int(c): (s, float(t), int(m))
            for c, s, t, m in zip(
                state["campaign_ids"][j] or [],
                state["statuses"][j] or [],
                state["throttles"][j] or [],
                state["targeting_masks"][j] or [],
                strict=True,
            )
        }
        for row in rows:
            cid = row["campaign_id"]
            if cid % DELIVERY_SHARDS == shard:
                mask = targeting_mask({c: row[c] for c in TARGET_COLUMNS}, cid)
                entries[cid] = (row["status"], float(row["throttle"]), mask)
        listed = sorted(entries)
        shard_rows.append(
            {
                "delivery_shard_id": shard,
                "event_timestamp": max(r["event_timestamp"] for r in rows),
                "campaign_ids": listed,
                "statuses": [entries[c][0] for c in listed],
                "throttles": [entries[c][1] for c in listed],
                "targeting_masks": [entries[c][2] for c in listed],
                # Monotonic across a rebuild of the offline table (versions are milliseconds):
                # the watcher rereads a shard whenever its version differs from the last seen.
                "version": max(int(state["version"][j] or 0) + 1, time.time_ns() // 1_000_000),
            }
        )
    _push(store, "campaign_delivery_push", rows)
    _push(store, "delivery_shard_push", shard_rows)
    return {"campaigns": ids, "shards": shards}


@dataclass(frozen=True)
class Impression:
    """One ad shown to one user (what the frequency caps count).

    Args:
        user_id: the user.
        ad_id: the ad.
        advertiser_id: the ad's advertiser.
        timestamp: when it was shown (UTC); its UTC date is the day it counts for.
    """

    user_id: int
    ad_id: int
    advertiser_id: int
    timestamp: datetime

    def __post_init__(self) -> None:
        uid = _positive_id("user_id", self.user_id)
        owner = f"user {uid}: "
        _positive_id("ad_id", self.ad_id, owner)
        _positive_id("advertiser_id", self.advertiser_id, owner)
        _aware("timestamp", self.timestamp, owner)


def _day(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%d")


def push_impressions(store: FeatureStore, impressions: Sequence[Impression]) -> None:
    """Adds impressions to their users' counts of the day in the online store (a new day starts
    from zero; an impression of a day before the stored one is ignored), in time order."""
    if not impressions:
        return
    by_user: dict[int, list[Impression]] = {}
    for imp in sorted(impressions, key=lambda i: i.timestamp):
        by_user.setdefault(imp.user_id, []).append(imp)
    users = list(by_user)
    current = _read(store, IMPRESSIONS_VIEW, IMPRESSION_FIELDS, "user_id", users)
    rows = []
    for i, user in enumerate(users):
        day = current["impression_day"][i]
        ads = dict(
            zip(
                current["impressed_ad_ids"][i] or [],
                current["ad_impression_counts"][i] or [],
                strict=True,
            )
        )
        advertisers = dict(
            zip(
                current["impressed_advertiser_ids"][i] or [],
                current["advertiser_impression_counts"][i] or [],
                strict=True,
            )
        )
        for imp in by_user[user]:
            if day is not None and _day(imp.timestamp) < day:
                continue  # a late report of an earlier day: today's counts stand
            if _day(imp.timestamp) != day:
                day, ads, advertisers = _day(imp.timestamp), {}, {}
            ads[imp.ad_id] = ads.get(imp.ad_id, 0) + 1
            advertisers[imp.advertiser_id] = advertisers.get(imp.advertiser_id, 0) + 1
        rows.append(
            {
                "user_id": user,
                "event_timestamp": by_user[user][-1].timestamp,
                "impression_day": day,
                "impressed_ad_ids": list(ads),
                "ad_impression_counts": list(ads.values()),
                "impressed_advertiser_ids": list(advertisers),
                "advertiser_impression_counts": list(advertisers.values()),
            }
        )
    _push(store, "user_ad_impressions_push", rows)


def push_hidden_advertisers(
    store: FeatureStore, hides: Sequence[tuple[int, int]], timestamp: datetime | None = None
) -> None:
    """Adds (user_id, advertiser_id) hides to the users' hidden advertisers online."""
    for pair in hides:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ConfigError(
                "hides", f"each must be a (user_id, advertiser_id) pair, got {pair!r}"
            )
        user, advertiser = pair
        _positive_id("user_id", user)
        _positive_id("advertiser_id", advertiser, f"user {user}: ")
    if timestamp is not None:
        _aware("timestamp", timestamp, "")
    by_user: dict[int, list[int]] = {}
    for user, advertiser in hides:
        by_user.setdefault(user, []).append(advertiser)
    if not by_user:
        return
    users = list(by_user)
    current = _read(store, HIDDEN_VIEW, ("hidden_advertiser_ids",), "user_id", users)
    rows = []
    for i, user in enumerate(users):
        hidden = list(current["hidden_advertiser_ids"][i] or [])
        hidden += [a for a in dict.fromkeys(by_user[user]) if a not in hidden]
        rows.append(
            {
                "user_id": user,
                "event_timestamp": timestamp or _now(),
                "hidden_advertiser_ids": hidden,
            }
        )
    _push(store, "user_hidden_advertisers_push", rows)
