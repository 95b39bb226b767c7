"""The synthetic ads marketplace: users, advertisers, campaigns, ads, organic items, three
surfaces and an event log of organic engagements, ad impressions, clicks and attributed
conversions, with the ground truth that produced them.

The generator streams users in chunks (``chunk_users``), so memory is bounded by the chunk and by
the ad/item catalogues, not by the number of users. It is deterministic for a given config: each
random stream is seeded from ``(seed, stream, chunk)``.

Ad delivery follows the constraints a real ads system enforces, so the log is consistent with
them: an impression goes only to a user its campaign targets (country, age bucket, device,
surface), never for a paused campaign, never for an advertiser the user has hidden, within the
frequency caps (per user, ad and day; per user, advertiser and day) and within the campaign's
delivery plan for the day: a pacing controller that forecasts the day's demand against the daily
budget throttles an ``even`` campaign (it takes part in a share of its auctions) and lets an
``asap`` campaign run until the forecast says its budget is spent (``exhausted_ts``). Where the
incumbent's first pick breaks a constraint it picks again (up to ``_RESAMPLES`` times).

Output layout (all parquet)::

    manifest.json          config, row counts, and the snapshot hash of every file
    users.parquet          visible user attributes
    advertisers.parquet    campaigns.parquet (with targeting and daily budget)
    ads.parquet    items.parquet    surfaces.parquet
    delivery_plan.parquet  per campaign and day: pacing throttle, budget exhaustion time
    hidden_advertisers.parquet   which user hid which advertiser, and when
    events/part-NNNNN.parquet
    truth/users.parquet    long-term interest mixture and activity rate
    truth/ads.parquet      latent vector and quality   truth/items.parquet
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from candgen.data.synth_text import (
    ADJECTIVES,
    AUDIENCES,
    BENEFITS,
    CATEGORIES,
    CATEGORY_NOUNS,
    brand_name,
    query_text,
)
from candgen.data.targeting import (
    AGE_BUCKETS,
    COUNTRIES,
    DEVICES,
    TARGET_COLUMNS,
    dimension_mask,
    targeting_lists,
)
from candgen.errors import ConfigError
from candgen.vocab import SURFACES

AD_ID_OFFSET: Final = 1_000_000_000
"""Ad ids are ``AD_ID_OFFSET + k``; item ids are ``1 + k``: one id space, never colliding."""

ORGANIC_ACTIONS: Final = ("view", "like", "save")
ORGANIC_ACTION_PROBS: Final = (0.75, 0.2, 0.05)
_SURFACE_CLICK_OFFSET: Final = np.array([0.0, 0.6, 0.3])  # search shows intent; related, context
_SECONDS_PER_DAY: Final = 86_400
_CANDIDATES: Final = 16  # what the incumbent shows per engagement, for the user to pick from
_US_PER_SECOND: Final = 1_000_000
_MAX_USERS: Final = 100_000_000
_MAX_ADS: Final = 2_000_000_000 - 1
_RESAMPLES: Final = 8  # picks per impression slot before the slot goes unfilled
PACING_MODES: Final = ("even", "asap")


def _stream(seed: int, name: str, *extra: int) -> np.random.Generator:
    # A stable integer per stream name keeps streams independent and reproducible.
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    return np.random.default_rng([seed, key, *extra])


@dataclass(frozen=True)
class SynthConfig:
    """Sizes and behaviour of the synthetic marketplace. CLI flags map 1:1 onto these fields.

    Args:
        users: number of users.
        ads: number of ads.
        days: number of simulated days of events.
        seed: random seed; the same config writes the same files.
        items: number of organic items (0: as many as ``ads``).
        advertisers: number of advertisers (0: one per 20 ads, at least 1).
        categories: number of product categories (1 to 24).
        latent_dim: dimension of the hidden taste space.
        start_date: first simulated day, ISO date, UTC.
        sessions_per_user_day: mean sessions per user per day.
        organic_per_session: mean organic engagements per session.
        impressions_per_session: mean ad impressions per session.
        surface_mix: probabilities of home, search and related for a session.
        ctr_min, ctr_max: every impression's true click probability lies in this range.
        cvr_min, cvr_max: every click's true conversion probability lies in this range.
        attribution_window_days: a conversion later than this after its click is not attributed.
        conversion_delay_hours: mean delay from click to conversion.
        report_delay_hours: mean delay from a conversion to its arrival in the log.
        intent_stay_prob: probability that a session keeps the previous session's intent.
        intent_explore_prob: probability that a new intent is outside the user's long-term mix.
        paused_campaign_fraction: fraction of campaigns paused at some day of the simulation.
        search_explore_prob: probability that a search session's intent is outside the user's
            long-term mix (people search for what their feed does not show them).
        taste_strength: how strongly a user's own taste picks among a category's items and ads
            (0: by popularity alone, as if every user liked the same things).
        context_strength: how strongly a related-items session follows its context item.
        query_vague_prob: probability that a search query names only a category.
        query_brand_prob: probability that a search query names a brand of the category.
        query_typo_prob: probability that a search query has a typo.
        untargeted_campaign_fraction: fraction of campaigns that target everyone.
        hidden_advertiser_prob: probability that a user hides advertisers (one to three).
        frequency_cap: most impressions of one ad to one user in a day.
        advertiser_frequency_cap: most impressions of one advertiser's ads to one user in a day.
        budget_pressure: median of a campaign's forecast daily demand over its daily budget
            (above 1, most campaigns are throttled or run out of budget each day).
        chunk_users: users generated and written per chunk (bounds memory).
    """

    users: int = 2_000
    ads: int = 5_000
    days: int = 14
    seed: int = 0
    items: int = 0
    advertisers: int = 0
    categories: int = 24
    latent_dim: int = 16
    start_date: str = "2026-01-01"
    sessions_per_user_day: float = 1.0
    organic_per_session: float = 3.0
    impressions_per_session: float = 3.0
    surface_mix: tuple[float, float, float] = (0.5, 0.3, 0.2)
    ctr_min: float = 0.002
    ctr_max: float = 0.2
    cvr_min: float = 0.01
    cvr_max: float = 0.3
    attribution_window_days: float = 7.0
    conversion_delay_hours: float = 24.0
    report_delay_hours: float = 6.0
    intent_stay_prob: float = 0.6
    intent_explore_prob: float = 0.15
    paused_campaign_fraction: float = 0.1
    search_explore_prob: float = 0.5
    taste_strength: float = 8.0
    context_strength: float = 10.0
    query_vague_prob: float = 0.1
    query_brand_prob: float = 0.15
    query_typo_prob: float = 0.05
    untargeted_campaign_fraction: float = 0.3
    hidden_advertiser_prob: float = 0.05
    frequency_cap: int = 3
    advertiser_frequency_cap: int = 10
    budget_pressure: float = 0.8
    chunk_users: int = 5_000

    def __post_init__(self) -> None:
        def whole(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(name, f"must be a whole number, got {v!r}")
            if not lo <= v <= hi:
                raise ConfigError(name, f"must be between {lo:,} and {hi:,}, got {v:,}")

        def prob(name: str) -> None:
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0.0 <= v <= 1.0):
                raise ConfigError(name, f"must be a probability in [0, 1], got {v!r}")

        def positive(name: str) -> None:
            v = getattr(self, name)
            if not (isinstance(v, int | float) and v > 0 and math.isfinite(v)):
                raise ConfigError(name, f"must be a positive number, got {v!r}")

        whole("users", 1, _MAX_USERS)
        whole("ads", 1, _MAX_ADS)
        whole("days", 1, 3_650)
        whole("seed", 0, 2**32 - 1)
        whole("items", 0, _MAX_ADS)
        whole("advertisers", 0, _MAX_ADS)
        whole("categories", 1, len(CATEGORY_NOUNS))
        whole("latent_dim", 2, 1_024)
        whole("chunk_users", 1, 10_000_000)
        whole("frequency_cap", 1, 1_000)
        whole("advertiser_frequency_cap", 1, 10_000)
        try:
            start = datetime.fromisoformat(self.start_date)
        except (TypeError, ValueError):
            raise ConfigError(
                "start_date", f"must be an ISO date like 2026-01-01, got {self.start_date!r}"
            ) from None
        if start.time() != datetime.min.time() or start.tzinfo is not None:
            # Simulated days must be UTC days: frequency caps and budgets count per UTC day.
            raise ConfigError(
                "start_date",
                f"must be a date without a time, like 2026-01-01, got {self.start_date!r}",
            )
        for name in (
            "sessions_per_user_day",
            "organic_per_session",
            "impressions_per_session",
            "attribution_window_days",
            "conversion_delay_hours",
            "report_delay_hours",
            "budget_pressure",
        ):
            positive(name)
        for name in ("taste_strength", "context_strength"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 <= v <= 100):
                raise ConfigError(name, f"must be a number in [0, 100], got {v!r}")
        for name in (
            "ctr_min",
            "ctr_max",
            "cvr_min",
            "cvr_max",
            "intent_stay_prob",
            "intent_explore_prob",
            "paused_campaign_fraction",
            "search_explore_prob",
            "query_vague_prob",
            "query_brand_prob",
            "query_typo_prob",
            "untargeted_campaign_fraction",
            "hidden_advertiser_prob",
        ):
            prob(name)
        if not self.ctr_min < self.ctr_max:
            raise ConfigError("ctr_min", f"must be below ctr_max ({self.ctr_max})")
        if not self.cvr_min < self.cvr_max:
            raise ConfigError("cvr_min", f"must be below cvr_max ({self.cvr_max})")
        mix = self.surface_mix
        if (
            len(mix) != len(SURFACES)
            or any(not isinstance(p, int | float) or p < 0 for p in mix)
            or abs(sum(mix) - 1.0) > 1e-6
        ):
            raise ConfigError(
                "surface_mix", f"must be 3 non-negative probabilities summing to 1, got {mix!r}"
            )

    @property
    def n_items(self) -> int:
        return self.items or self.ads

    @property
    def n_advertisers(self) -> int:
        return self.advertisers or max(1, self.ads // 20)

    @property
    def start(self) -> datetime:
        d = datetime.fromisoformat(self.start_date)
        return d.replace(tzinfo=UTC) if d.tzinfo is None else d.astimezone(UTC)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=self.days)


@dataclass
class SynthSummary:
    """What a generation wrote: row counts per table and per event type, and the snapshot hash."""

    out_dir: Path
    rows: dict[str, int] = field(default_factory=dict)
    events_by_type: dict[str, int] = field(default_factory=dict)
    snapshot: str = ""


@dataclass(frozen=True)
class _Catalog:
    """Ads or items held in memory for sampling, sorted by (category, created_day)."""

    category: np.ndarray  # int16 per entry
    latent: np.ndarray  # float32 [n, d], unit norm
    weight: np.ndarray  # float64 sampling weight of the incumbent delivery system
    created_day: np.ndarray  # int32, may be negative (before the simulation)
    segment_start: np.ndarray  # int64 [C+1] offsets of each category in the sorted order
    order: np.ndarray  # int64 sorted position -> original index
    cum_weight: np.ndarray  # float64 cumulative weight in sorted order
    created_sorted: np.ndarray  # created_day in sorted order

    @classmethod
    def build(
        cls,
        category: np.ndarray,
        latent: np.ndarray,
        weight: np.ndarray,
        created_day: np.ndarray,
        n_categories: int,
    ) -> _Catalog:
        order = np.lexsort((created_day, category))
        seg = np.searchsorted(category[order], np.arange(n_categories + 1), side="left")
        return cls(
            category,
            latent,
            weight,
            created_day,
            seg,
            order,
            np.cumsum(weight[order]),
            created_day[order],
        )

    def sample(self, rng: np.random.Generator, categories: np.ndarray, day: int) -> np.ndarray:
        """Samples one entry per requested category among those created by ``day``.

        Returns original indices, or -1 where a category has nothing eligible yet.
        """
        start = self.segment_start[categories]
        # Entries are sorted by created_day inside each category: eligible ones form a prefix.
        stop = np.empty_like(start)
        for c in np.unique(categories):
            lo, hi = self.segment_start[c], self.segment_start[c + 1]
            stop[categories == c] = lo + np.searchsorted(self.created_sorted[lo:hi], day, "right")
        empty = stop <= start
        before = np.where(start > 0, self.cum_weight[np.maximum(start - 1, 0)], 0.0)
        upto = self.cum_weight[np.maximum(stop - 1, 0)]
        u = before + rng.random(len(categories)) * (upto - before)
        pos = np.searchsorted(self.cum_weight, u, side="right")
        pos = np.clip(pos, start, np.maximum(stop - 1, start))
        out = self.order[np.minimum(pos, len(self.order) - 1)]
        return np.where(empty, -1, out)


def _popcount(masks: np.ndarray) -> np.ndarray:
    bits: np.ndarray = np.unpackbits(masks.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1)
    count: np.ndarray = bits.sum(axis=1)
    return count


def _unit(x: np.ndarray) -> np.ndarray:
    unit: np.ndarray = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return unit.astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    y: np.ndarray = 1.0 / (1.0 + np.exp(-x))
    return y


def _ts(base_us: int, seconds: np.ndarray) -> pa.Array:
    us = base_us + np.round(seconds * _US_PER_SECOND).astype(np.int64)
    return pa.array(us, type=pa.timestamp("us", tz="UTC"))


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")


class MarketplaceGenerator:
    """Generates one marketplace. Use :func:`generate`; this class holds the shared state."""

    def __init__(self, config: SynthConfig) -> None:
        self.cfg = config
        c = config
        rng = _stream(c.seed, "world")
        self.centroids = _unit(rng.normal(size=(c.categories, c.latent_dim)))
        self.start_us = int(c.start.timestamp() * _US_PER_SECOND)
        self.end_seconds = c.days * _SECONDS_PER_DAY

    # -- catalogues ---------------------------------------------------------------------------

    def advertisers(self) -> pa.Table:
        c = self.cfg
        rng = _stream(c.seed, "advertisers")
        n = c.n_advertisers
        ids = np.arange(1, n + 1, dtype=np.int64)
        self.adv_vertical = rng.integers(0, c.categories, n).astype(np.int16)
        self.adv_of_vertical = [np.flatnonzero(self.adv_vertical == k) for k in range(c.categories)]
        self.adv_paused = rng.random(n) < 0.03
        budget = np.round(rng.lognormal(6.0, 1.0, n), 2)
        return pa.table(
            {
                "advertiser_id": ids,
                "name": [brand_name(int(i)) for i in ids],
                "vertical": pa.array([CATEGORIES[v] for v in self.adv_vertical]),
                "daily_budget": budget,
                "status": np.where(self.adv_paused, "paused", "active"),
                "created_ts": _ts(self.start_us, -rng.uniform(30, 720, n) * _SECONDS_PER_DAY),
            }
        )

    def draw_campaigns(self) -> None:
        """Draws the campaigns: advertiser, flight, pause, bid, objective and targeting (the
        table is written by ``campaigns_table`` once the ads give the budgets their demand)."""
        c = self.cfg
        rng = _stream(c.seed, "campaigns")
        n = max(1, c.ads // 5)
        advertiser = rng.integers(0, c.n_advertisers, n)
        start_day = rng.integers(-30, max(1, c.days // 2), n).astype(np.int32)
        paused = rng.random(n) < c.paused_campaign_fraction
        pause_day = np.where(paused, rng.integers(0, c.days, n), np.iinfo(np.int32).max)
        # An advertiser paused account pauses every one of its campaigns from the start.
        pause_day = np.where(self.adv_paused[advertiser], start_day, pause_day).astype(np.int32)
        self.camp_advertiser = advertiser
        self.camp_start_day = start_day
        self.camp_pause_day = pause_day
        self.camp_cpc = np.round(rng.uniform(0.2, 3.0, n), 2)
        self.camp_objective = np.where(rng.random(n) < 0.5, "clicks", "conversions")
        self.camp_target = self._targeting(n)

    def _targeting(self, n: int) -> dict[str, np.ndarray]:
        """Each campaign's audience as one bit mask per dimension (all bits: everyone).

        An advertiser's vertical has a core age range, and a campaign that targets ages picks a
        range around it: age targeting follows what the ads are about, as it does in practice.
        """
        c = self.cfg
        rng = _stream(c.seed, "targeting")
        core_age = _stream(c.seed, "world", 1).integers(0, len(AGE_BUCKETS), c.categories)
        targeted = rng.random(n) >= c.untargeted_campaign_fraction

        def subsets(n_values: int, p: float, max_size: int) -> np.ndarray:
            size = rng.integers(1, max_size + 1, n)
            keys = rng.random((n, n_values))
            # The `size` values with the smallest keys: a uniform subset of that size.
            rank = keys.argsort(axis=1).argsort(axis=1)
            bits = ((rank < size[:, None]) << np.arange(n_values)).sum(axis=1)
            full = (1 << n_values) - 1
            return np.where(targeted & (rng.random(n) < p), bits, full).astype(np.int64)

        centre = core_age[self.adv_vertical[self.camp_advertiser]]
        lo = np.clip(centre - rng.integers(0, 2, n), 0, len(AGE_BUCKETS) - 1)
        hi = np.clip(centre + rng.integers(0, 2, n), 0, len(AGE_BUCKETS) - 1)
        ages = (1 << (hi + 1)) - (1 << lo)
        full_age = (1 << len(AGE_BUCKETS)) - 1
        return {
            "country": subsets(len(COUNTRIES), 0.6, 4),
            "age": np.where(targeted & (rng.random(n) < 0.6), ages, full_age).astype(np.int64),
            "device": subsets(len(DEVICES), 0.3, 2),
            "surface": subsets(len(SURFACES), 0.3, 2),
        }

    def delivery_plan(self) -> pa.Table:
        """The pacing controller's plan per campaign and day, from a forecast of the day's
        demand: daily budgets (kept in ``camp_daily_budget``), an ``even`` campaign's throttle
        and an ``asap`` campaign's exhaustion time."""
        c = self.cfg
        rng = _stream(c.seed, "pacing")
        n = len(self.camp_advertiser)
        # Forecast clicks a day: the impressions a campaign's ads draw within their categories
        # (the incumbent samples by weight per category), times a typical CTR, less the share
        # of users the targeting leaves out.
        cat = self.ad_catalog.category
        cat_weight = np.bincount(cat, self.ad_catalog.weight, minlength=c.categories)
        share = self.ad_catalog.weight / np.maximum(cat_weight[cat], 1e-12) / c.categories
        per_day = c.users * c.sessions_per_user_day * c.impressions_per_session
        ad_clicks = per_day * share * (c.ctr_min + 0.25 * (c.ctr_max - c.ctr_min))
        audience = np.ones(n)
        for dim, values in (("country", COUNTRIES), ("age", AGE_BUCKETS), ("device", DEVICES)):
            audience *= _popcount(self.camp_target[dim]) / len(values)
        demand = np.bincount(self.ad_campaign, ad_clicks, minlength=n) * audience * self.camp_cpc
        # A daily budget buys at least one click.
        budget = np.maximum(
            np.round(demand / c.budget_pressure * rng.lognormal(0.0, 0.5, n), 2), self.camp_cpc
        )
        self.camp_daily_budget = budget
        self.camp_pacing = np.where(rng.random(n) < 0.7, 0, 1)  # index into PACING_MODES
        ratio = (demand / budget)[:, None] * rng.lognormal(0.0, 0.3, (n, c.days))
        even = self.camp_pacing[:, None] == 0
        self.plan_throttle = np.where(even, 1.0 / np.maximum(ratio, 1.0), 1.0)
        # An asap campaign spends at full speed until its forecast spend reaches the budget.
        self.plan_exhausted = np.where(
            ~even & (ratio > 1.0), _SECONDS_PER_DAY / np.maximum(ratio, 1.0), np.inf
        )
        day = np.broadcast_to(np.arange(c.days), (n, c.days)).ravel()
        exhausted = self.plan_exhausted.ravel()
        never = ~np.isfinite(exhausted)
        return pa.table(
            {
                "campaign_id": np.repeat(np.arange(1, n + 1, dtype=np.int64), c.days),
                "day_ts": _ts(self.start_us, day * float(_SECONDS_PER_DAY)),
                "throttle": self.plan_throttle.ravel().astype(np.float32),
                "exhausted_ts": pa.array(
                    np.where(
                        never,
                        0,
                        self.start_us
                        + np.round(
                            (day * _SECONDS_PER_DAY + np.where(never, 0, exhausted)) * 1e6
                        ).astype(np.int64),
                    ),
                    type=pa.timestamp("us", tz="UTC"),
                    mask=never,
                ),
            }
        )

    def campaigns_table(self) -> pa.Table:
        c = self.cfg
        n = len(self.camp_advertiser)
        pause_day = self.camp_pause_day

        masks = sum(dimension_mask(dim, bits) for dim, bits in self.camp_target.items())
        lists = [targeting_lists(m) for m in np.asarray(masks).tolist()]
        targeting = {
            column: pa.array([row[column] for row in lists], type=pa.list_(pa.string()))
            for column in TARGET_COLUMNS
        }
        return pa.table(
            {
                "campaign_id": np.arange(1, n + 1, dtype=np.int64),
                "advertiser_id": (self.camp_advertiser + 1).astype(np.int64),
                "objective": self.camp_objective,
                "daily_budget": self.camp_daily_budget,
                "pacing": np.array(PACING_MODES)[self.camp_pacing],
                "cpc_bid": self.camp_cpc,
                **targeting,
                "start_ts": _ts(self.start_us, self.camp_start_day * float(_SECONDS_PER_DAY)),
                "paused_ts": pa.array(
                    np.where(
                        pause_day < c.days,
                        self.start_us + pause_day.astype(np.int64) * _SECONDS_PER_DAY * 10**6,
                        0,
                    ),
                    type=pa.timestamp("us", tz="UTC"),
                    mask=pause_day >= c.days,
                ),
                "status": np.where(pause_day < c.days, "paused", "active"),
            }
        )

    def ads(self, out_dir: Path) -> int:
        """Builds the ad catalogue in memory and writes ads.parquet and truth/ads.parquet."""
        c = self.cfg
        rng = _stream(c.seed, "ads")
        n = c.ads
        n_camp = len(self.camp_advertiser)
        campaign = rng.integers(0, n_camp, n)
        advertiser = self.camp_advertiser[campaign]
        vertical = self.adv_vertical[advertiser]
        category = np.where(rng.random(n) < 0.8, vertical, rng.integers(0, c.categories, n)).astype(
            np.int16
        )
        latent = _unit(self.centroids[category] + 0.5 * rng.normal(size=(n, c.latent_dim)))
        quality = rng.normal(0.0, 0.5, n).astype(np.float32)
        created = np.maximum(self.camp_start_day[campaign], rng.integers(-60, c.days, n)).astype(
            np.int32
        )
        price = np.round(rng.lognormal(3.0 + 0.05 * category, 0.6), 2)
        weight = np.exp(quality) * self.camp_cpc[campaign]
        self.ad_campaign = campaign
        self.ad_pause_day = self.camp_pause_day[campaign]
        self.ad_quality = quality
        self.ad_catalog = _Catalog.build(category, latent, weight, created, c.categories)
        ids = AD_ID_OFFSET + np.arange(1, n + 1, dtype=np.int64)
        adj = rng.integers(0, len(ADJECTIVES), n)
        noun = rng.integers(0, 4, n)
        self.ad_category, self.ad_noun, self.ad_advertiser = category, noun, advertiser
        self.ad_dev = self._taste_part(latent, category)
        aud = rng.integers(0, len(AUDIENCES), n)
        ben = rng.integers(0, len(BENEFITS), n)
        names = [brand_name(int(a) + 1) for a in range(c.n_advertisers)]
        titles = [
            f"{names[a]} {ADJECTIVES[j]} {CATEGORY_NOUNS[k][1][m]}"
            for a, j, k, m in zip(advertiser, adj, category, noun, strict=True)
        ]
        descriptions = [
            f"{ADJECTIVES[j].capitalize()} {CATEGORY_NOUNS[k][1][m]} for {AUDIENCES[u]}. "
            f"{BENEFITS[b]}."
            for j, k, m, u, b in zip(adj, category, noun, aud, ben, strict=True)
        ]
        pause_ts = self.start_us + self.ad_pause_day.astype(np.int64) * _SECONDS_PER_DAY * 10**6
        never = self.ad_pause_day >= c.days
        _write(
            pa.table(
                {
                    "ad_id": ids,
                    "campaign_id": (campaign + 1).astype(np.int64),
                    "advertiser_id": (advertiser + 1).astype(np.int64),
                    "category": pa.array([CATEGORIES[k] for k in category]),
                    "price": price,
                    "title": titles,
                    "description": descriptions,
                    "created_ts": _ts(self.start_us, created * float(_SECONDS_PER_DAY)),
                    "paused_ts": pa.array(
                        np.where(never, 0, pause_ts),
                        type=pa.timestamp("us", tz="UTC"),
                        mask=never,
                    ),
                    "status": np.where(never, "active", "paused"),
                }
            ),
            out_dir / "ads.parquet",
        )
        _write(
            pa.table(
                {
                    "ad_id": ids,
                    "category_index": category,
                    "quality": quality,
                    "latent": pa.FixedSizeListArray.from_arrays(
                        pa.array(latent.ravel()), c.latent_dim
                    ),
                }
            ),
            out_dir / "truth" / "ads.parquet",
        )
        return n

    def _taste_part(self, latent: np.ndarray, category: np.ndarray) -> np.ndarray:
        """What sets an entry apart within its category: its latent vector less the part along
        its category's centroid (where a user's own taste, ``pref``, looks)."""
        centre = self.centroids[category]
        along = np.einsum("nd,nd->n", latent, centre)[:, None] * centre
        part: np.ndarray = (latent - along).astype(np.float32)
        return part

    def _choose(
        self,
        rng: np.random.Generator,
        catalog: _Catalog,
        part: np.ndarray,
        categories: np.ndarray,
        day: int,
        pref: np.ndarray,
        bonus: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> np.ndarray:
        """One entry per row: ``_CANDIDATES`` drawn from the row's category as the incumbent
        system would show them, of which the user picks by taste (logit ``taste_strength *
        <pref, part>`` plus ``bonus``'s (rows, candidates) -> logits, if any).

        Returns original indices, -1 where the category has nothing yet.
        """
        n = len(categories)
        if n == 0:
            return np.zeros(0, np.int64)
        cand = catalog.sample(rng, np.repeat(categories, _CANDIDATES), day).reshape(n, -1)
        safe = np.maximum(cand, 0)
        logit = self.cfg.taste_strength * np.einsum("nd,ncd->nc", pref, part[safe])
        if bonus is not None:
            logit = logit + bonus(safe)
        logit = np.where(cand >= 0, logit, -np.inf)
        pick = np.argmax(logit + rng.gumbel(size=logit.shape), axis=1)
        chosen: np.ndarray = cand[np.arange(n), pick]
        return chosen

    def _organic_bonus(
        self, cand: np.ndarray, noun: np.ndarray, category: np.ndarray, context: np.ndarray
    ) -> np.ndarray:
        """(rows, candidates) logits an organic pick adds for the request's context: the noun a
        search named (-1: none) in its category, and closeness to a context item's taste part
        (zeros: none)."""
        named = (self.item_noun[cand] == noun[:, None]) & (
            self.item_category[cand] == category[:, None]
        )
        near = np.einsum("nd,ncd->nc", context, self.item_dev[cand])
        bonus: np.ndarray = 2.0 * named + self.cfg.context_strength * near
        return bonus

    def items(self, out_dir: Path) -> int:
        c = self.cfg
        rng = _stream(c.seed, "items")
        n = c.n_items
        category = rng.integers(0, c.categories, n).astype(np.int16)
        latent = _unit(self.centroids[category] + 0.5 * rng.normal(size=(n, c.latent_dim)))
        popularity = rng.zipf(1.6, n).astype(np.float64).clip(max=10_000)
        created = rng.integers(-365, c.days, n).astype(np.int32)
        # What the incumbent feed shows leans on popularity, less than in proportion to it: a
        # feed that showed only the head would leave taste nothing to choose from.
        shown = np.sqrt(popularity)
        self.item_catalog = _Catalog.build(category, latent, shown, created, c.categories)
        ids = np.arange(1, n + 1, dtype=np.int64)
        noun = rng.integers(0, 4, n)
        self.item_category, self.item_noun = category, noun
        self.item_dev = self._taste_part(latent, category)
        _write(
            pa.table(
                {
                    "item_id": ids,
                    "category": pa.array([CATEGORIES[k] for k in category]),
                    "title": [
                        f"{CATEGORY_NOUNS[k][1][m]} #{i}"
                        for k, m, i in zip(category, noun, ids, strict=True)
                    ],
                    "created_ts": _ts(self.start_us, created * float(_SECONDS_PER_DAY)),
                }
            ),
            out_dir / "items.parquet",
        )
        _write(
            pa.table(
                {
                    "item_id": ids,
                    "category_index": category,
                    "popularity": popularity,
                    "latent": pa.FixedSizeListArray.from_arrays(
                        pa.array(latent.ravel()), c.latent_dim
                    ),
                }
            ),
            out_dir / "truth" / "items.parquet",
        )
        return n

    # -- users and events ---------------------------------------------------------------------

    def user_chunk(
        self, chunk: int, lo: int, hi: int
    ) -> tuple[pa.Table, pa.Table, dict[str, np.ndarray]]:
        """Returns (users, truth users, per-chunk state) for user indices [lo, hi)."""
        c = self.cfg
        rng = _stream(c.seed, "users", chunk)
        n = hi - lo
        mixture = rng.gamma(0.3, 1.0, size=(n, c.categories)) + 1e-9
        mixture /= mixture.sum(axis=1, keepdims=True)
        activity = c.sessions_per_user_day * rng.lognormal(-0.125, 0.5, n)
        ids = np.arange(lo + 1, hi + 1, dtype=np.int64)
        age = rng.integers(0, len(AGE_BUCKETS), n)
        country = rng.integers(0, len(COUNTRIES), n)
        device = rng.integers(0, len(DEVICES), n)
        users = pa.table(
            {
                "user_id": ids,
                "age_bucket": pa.array(np.array(AGE_BUCKETS)[age]),
                "country": pa.array(np.array(COUNTRIES)[country]),
                "device": pa.array(np.array(DEVICES)[device]),
                "signup_ts": _ts(self.start_us, -rng.uniform(1, 720, n) * _SECONDS_PER_DAY),
            }
        )
        truth = pa.table(
            {
                "user_id": ids,
                "activity": activity,
                "interest": pa.FixedSizeListArray.from_arrays(
                    pa.array(mixture.astype(np.float32).ravel()), c.categories
                ),
            }
        )
        # Each user's own taste within a category (what tells apart two runners).
        pref = _unit(rng.normal(size=(n, c.latent_dim)))
        truth = truth.append_column(
            "taste",
            pa.FixedSizeListArray.from_arrays(pa.array(pref.ravel()), c.latent_dim),
        )
        state = {
            "mixture": mixture,
            "activity": activity,
            "ids": ids,
            "pref": pref,
            "age": age,
            "country": country,
            "device": device,
        }
        return users, truth, state

    def hidden_chunk(self, chunk: int, state: dict[str, np.ndarray]) -> pa.Table:
        """The advertisers this chunk's users hide, and when: advertisers of the verticals a user
        is interested in (those whose ads they see). Adds the sorted (user, advertiser) keys and
        hide times to ``state`` for the event simulation."""
        c = self.cfg
        rng = _stream(c.seed, "hidden", chunk)
        n = len(state["ids"])
        hides = np.where(rng.random(n) < c.hidden_advertiser_prob, rng.integers(1, 4, n), 0)
        user = np.repeat(np.arange(n), hides)
        vertical = self._sample_category(rng, state["mixture"][user])
        advertiser = np.array(
            [
                pool[int(rng.integers(0, len(pool)))] if len(pool) else -1
                for pool in (self.adv_of_vertical[int(v)] for v in vertical)
            ],
            dtype=np.int64,
        )
        when = rng.uniform(-30, c.days, len(user)) * _SECONDS_PER_DAY
        keep = advertiser >= 0
        user, advertiser, when = user[keep], advertiser[keep], when[keep]
        key = user * c.n_advertisers + advertiser
        # A user who hides one advertiser twice: the first time counts.
        order = np.lexsort((when, key))
        order = order[np.r_[True, key[order][1:] != key[order][:-1]][: len(order)]]
        state["hidden_key"], state["hidden_at"] = key[order], when[order]
        return pa.table(
            {
                "user_id": state["ids"][user[order]],
                "advertiser_id": advertiser[order] + 1,
                "hidden_ts": _ts(self.start_us, when[order]),
            }
        )

    def _sample_category(self, rng: np.random.Generator, mixture: np.ndarray) -> np.ndarray:
        cum = np.cumsum(mixture, axis=1)
        u = rng.random(len(mixture))[:, None] * cum[:, -1:]
        category: np.ndarray = np.minimum((cum < u).sum(axis=1), mixture.shape[1] - 1)
        return category.astype(np.int16)

    def _queries(
        self, rng: np.random.Generator, intents: np.ndarray
    ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """A query per search session of these intents: (texts, the noun each names or -1 for
        a vague one, the advertiser each names or -1)."""
        c = self.cfg
        n = len(intents)
        vague = rng.random(n) < c.query_vague_prob
        noun = np.where(vague, -1, rng.integers(0, 4, n))
        adjective = np.where(rng.random(n) < 0.3, rng.integers(0, len(ADJECTIVES), n), -1)
        branded = ~vague & (rng.random(n) < c.query_brand_prob)
        typo = rng.random(n) < c.query_typo_prob
        brand = np.full(n, -1, np.int64)
        texts = []
        for j in range(n):
            advertisers = self.adv_of_vertical[int(intents[j])]
            if branded[j] and len(advertisers):
                brand[j] = advertisers[int(rng.integers(0, len(advertisers)))]
            name = brand_name(int(brand[j]) + 1) if brand[j] >= 0 else ""
            texts.append(
                query_text(int(intents[j]), int(noun[j]), int(adjective[j]), name, typo[j], rng)
            )
        return texts, noun, brand

    def events_chunk(self, chunk: int, state: dict[str, np.ndarray]) -> pa.Table:
        """Simulates every day for the chunk's users and returns their events, sorted."""
        c = self.cfg
        rng = _stream(c.seed, "events", chunk)
        mixture, activity, user_ids = state["mixture"], state["activity"], state["ids"]
        pref = state["pref"]
        query_texts: list[str] = []
        n = len(user_ids)
        long_vec = _unit(mixture @ self.centroids)
        intent = self._sample_category(rng, mixture)
        cols: dict[str, list[np.ndarray]] = {k: [] for k in _EVENT_COLUMNS}
        session_counter = 0

        def emit(**kw: np.ndarray) -> None:
            m = len(kw["user"])
            for k in _EVENT_COLUMNS:
                cols[k].append(kw[k] if k in kw else np.full(m, -1, dtype=_EVENT_COLUMNS[k]))

        def sel(columns: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
            return {k: v[mask] for k, v in columns.items()}

        search, related = SURFACES.index("search"), SURFACES.index("related")
        for day in range(c.days):
            n_sess = rng.poisson(activity)
            s_user = np.repeat(np.arange(n), n_sess)
            if len(s_user) == 0:
                continue
            s_time = rng.uniform(0, _SECONDS_PER_DAY - 3_600, len(s_user))
            order = np.lexsort((s_time, s_user))
            s_user, s_time = s_user[order], s_time[order]
            n_s = len(s_user)
            s_surface = rng.choice(len(SURFACES), n_s, p=np.asarray(c.surface_mix))
            first = np.r_[True, s_user[1:] != s_user[:-1]]
            rank = np.arange(n_s) - np.maximum.accumulate(np.where(first, np.arange(n_s), 0))
            s_intent = np.empty(n_s, dtype=np.int16)
            for k in range(int(rank.max()) + 1):
                at = np.flatnonzero(rank == k)
                users_k = s_user[at]
                searching = s_surface[at] == search
                # A search names a fresh intent, often one the user's feed does not show.
                stay = ~searching & (rng.random(len(at)) < c.intent_stay_prob)
                explore = rng.random(len(at)) < np.where(
                    searching, c.search_explore_prob, c.intent_explore_prob
                )
                fresh = np.where(
                    explore,
                    rng.integers(0, c.categories, len(at)),
                    self._sample_category(rng, mixture[users_k]),
                )
                intent[users_k] = np.where(stay, intent[users_k], fresh)
                s_intent[at] = intent[users_k]
            s_id = (np.int64(chunk) << 36) + session_counter + np.arange(n_s, dtype=np.int64)
            session_counter += n_s
            day_base = day * _SECONDS_PER_DAY

            # The request context: a search session's query, a related session's context item
            # (the item the user is looking at, picked by taste; a page view, not an engagement).
            is_search, is_related = s_surface == search, s_surface == related
            s_query = np.full(n_s, -1, np.int64)
            s_qnoun = np.full(n_s, -1, np.int64)
            s_qbrand = np.full(n_s, -1, np.int64)
            texts, q_noun, q_brand = self._queries(rng, s_intent[is_search])
            s_query[is_search] = len(query_texts) + np.arange(len(texts))
            query_texts.extend(texts)
            s_qnoun[is_search], s_qbrand[is_search] = q_noun, q_brand
            ctx = np.full(n_s, -1, np.int64)
            rel = np.flatnonzero(is_related)
            ctx[rel] = self._choose(
                rng, self.item_catalog, self.item_dev, s_intent[rel], day, pref[s_user[rel]]
            )
            is_related &= ctx >= 0
            ctx_part = np.where(is_related[:, None], self.item_dev[np.maximum(ctx, 0)], 0.0).astype(
                np.float32
            )

            # Organic engagements: items from the session intent, sometimes the long-term mix,
            # picked by the user's taste, the query's noun and the context item.
            n_org = rng.poisson(c.organic_per_session, n_s)
            o_sess = np.repeat(np.arange(n_s), n_org)
            o_cat = np.where(
                rng.random(len(o_sess)) < 0.85,
                s_intent[o_sess],
                self._sample_category(rng, mixture[s_user[o_sess]]),
            ).astype(np.int64)

            o_item = self._choose(
                rng,
                self.item_catalog,
                self.item_dev,
                o_cat,
                day,
                pref[s_user[o_sess]],
                functools.partial(
                    self._organic_bonus,
                    noun=s_qnoun[o_sess],
                    category=s_intent[o_sess],
                    context=ctx_part[o_sess],
                ),
            )
            keep = o_item >= 0
            o_sess, o_item = o_sess[keep], o_item[keep]
            o_offset = _within_session_offsets(rng, o_sess, 40.0)
            o_action = rng.choice(len(ORGANIC_ACTIONS), len(o_sess), p=ORGANIC_ACTION_PROBS)
            ctx_id = np.where(is_related, ctx + 1, -1)
            emit(
                user=s_user[o_sess],
                session=s_id[o_sess],
                t=day_base + s_time[o_sess] + o_offset,
                arrival=day_base + s_time[o_sess] + o_offset,
                surface=s_surface[o_sess],
                kind=np.full(len(o_sess), _KIND["engage"], np.int8),
                action=o_action.astype(np.int8),
                item=o_item.astype(np.int64) + 1,
                intent=s_intent[o_sess],
                query=s_query[o_sess],
                context=ctx_id[o_sess],
            )

            # Ad impressions by the incumbent system: on intent (a search's keywords more
            # often), else anywhere.
            n_imp = rng.poisson(c.impressions_per_session, n_s)
            i_sess = np.repeat(np.arange(n_s), n_imp)
            i_cat = np.where(
                rng.random(len(i_sess)) < np.where(is_search[i_sess], 0.7, 0.5),
                s_intent[i_sess],
                rng.integers(0, c.categories, len(i_sess)),
            ).astype(np.int64)
            i_offset = _within_session_offsets(rng, i_sess, 50.0)
            i_user, i_surface = s_user[i_sess], s_surface[i_sess]
            i_time = s_time[i_sess] + i_offset
            i_ad = np.full(len(i_sess), -1, np.int64)
            pending = np.arange(len(i_sess))
            for _ in range(_RESAMPLES):
                pick = self.ad_catalog.sample(rng, i_cat[pending], day)
                ok = self._deliverable(
                    rng, state, pick, i_user[pending], i_surface[pending], day, i_time[pending]
                )
                i_ad[pending[ok]] = pick[ok]
                pending = pending[~ok]
                if len(pending) == 0:
                    break
            live = (i_ad >= 0) & self._under_caps(i_user, i_ad, i_time)
            i_sess, i_ad, i_offset, i_user = i_sess[live], i_ad[live], i_offset[live], i_user[live]
            m = len(i_sess)
            taste = _unit(long_vec[i_user] + self.centroids[s_intent[i_sess]])
            affinity = np.einsum("nd,nd->n", taste, self.ad_catalog.latent[i_ad])
            own = np.einsum("nd,nd->n", pref[i_user], self.ad_dev[i_ad])
            # A click follows the query (its noun, its brand) and the context item too.
            named = (self.ad_noun[i_ad] == s_qnoun[i_sess]) & (
                self.ad_category[i_ad] == s_intent[i_sess]
            )
            brand = (self.ad_advertiser[i_ad] == s_qbrand[i_sess]) & (s_qbrand[i_sess] >= 0)
            near = np.einsum("nd,nd->n", ctx_part[i_sess], self.ad_dev[i_ad])
            on_context = is_related[i_sess] & (self.ad_category[i_ad] == s_intent[i_sess])
            match = (
                0.5 * c.taste_strength * own
                + 1.5 * named
                + 1.5 * brand
                + 0.5 * c.context_strength * near
                + 1.0 * on_context
            )
            quality = self.ad_quality[i_ad]
            surf = s_surface[i_sess]
            p_click = c.ctr_min + (c.ctr_max - c.ctr_min) * _sigmoid(
                5.0 * affinity + quality + match + _SURFACE_CLICK_OFFSET[surf] - 5.0
            )
            p_conv = c.cvr_min + (c.cvr_max - c.cvr_min) * _sigmoid(
                3.0 * affinity + quality + 0.5 * (surf == 1) - 2.5
            )
            t_imp = day_base + s_time[i_sess] + i_offset
            ad_ids = AD_ID_OFFSET + 1 + i_ad.astype(np.int64)
            camp = self.ad_campaign[i_ad].astype(np.int64)
            adv = self.camp_advertiser[camp].astype(np.int64) + 1
            common = dict(
                session=s_id[i_sess],
                surface=surf,
                ad=ad_ids,
                campaign=camp + 1,
                advertiser=adv,
                p_click=p_click.astype(np.float32),
                p_conv=p_conv.astype(np.float32),
                intent=s_intent[i_sess],
                query=s_query[i_sess],
                context=ctx_id[i_sess],
            )
            # ad_key ties an impression, its click and its conversion together within the chunk.
            imp_ref = (np.int64(day) << 32) + np.arange(m, dtype=np.int64)
            emit(
                user=i_user,
                t=t_imp,
                arrival=t_imp,
                kind=np.full(m, _KIND["impression"], np.int8),
                action=np.full(m, _ACTION["impression"], np.int8),
                ad_key=imp_ref,
                **common,
            )
            clicked = rng.random(m) < p_click
            t_click = t_imp + rng.exponential(5.0, m) + 1.0
            emit(
                user=i_user[clicked],
                t=t_click[clicked],
                arrival=t_click[clicked],
                kind=np.full(int(clicked.sum()), _KIND["click"], np.int8),
                action=np.full(int(clicked.sum()), _ACTION["click"], np.int8),
                ad_key=imp_ref[clicked],
                **sel(common, clicked),
            )
            delay = rng.exponential(c.conversion_delay_hours * 3_600.0, m)
            t_conv = t_click + delay
            arrival = t_conv + rng.exponential(c.report_delay_hours * 3_600.0, m)
            converted = (
                clicked
                & (rng.random(m) < p_conv)
                & (delay <= c.attribution_window_days * _SECONDS_PER_DAY)
                & (arrival < self.end_seconds)  # not yet reported when the log ends
            )
            emit(
                user=i_user[converted],
                t=t_conv[converted],
                arrival=arrival[converted],
                kind=np.full(int(converted.sum()), _KIND["conversion"], np.int8),
                action=np.full(int(converted.sum()), _ACTION["conversion"], np.int8),
                ad_key=imp_ref[converted],
                **sel(common, converted),
            )
        return self._events_table(chunk, cols, user_ids, query_texts)

    def _deliverable(
        self,
        rng: np.random.Generator,
        state: dict[str, np.ndarray],
        ad: np.ndarray,
        user: np.ndarray,
        surface: np.ndarray,
        day: int,
        time: np.ndarray,
    ) -> np.ndarray:
        """Which picks may be shown: a live ad whose campaign runs (not paused, within the
        day's plan: before its exhaustion, through its throttle), targets the user and the
        surface, of an advertiser the user has not hidden by then."""
        ok = ad >= 0
        safe = np.maximum(ad, 0)
        camp = self.ad_campaign[safe]
        target = self.camp_target
        for dim, value in (
            ("country", state["country"][user]),
            ("age", state["age"][user]),
            ("device", state["device"][user]),
            ("surface", surface),
        ):
            ok &= (target[dim][camp] >> value) & 1 == 1
        ok &= self.ad_pause_day[safe] > day
        ok &= time < self.plan_exhausted[camp, day]
        ok &= rng.random(len(ad)) < self.plan_throttle[camp, day]
        key = user * self.cfg.n_advertisers + self.camp_advertiser[camp]
        hidden_key, hidden_at = state["hidden_key"], state["hidden_at"]
        at = np.minimum(np.searchsorted(hidden_key, key), max(len(hidden_key) - 1, 0))
        if len(hidden_key):
            ok &= ~((hidden_key[at] == key) & (hidden_at[at] <= day * _SECONDS_PER_DAY + time))
        return ok

    def _under_caps(self, user: np.ndarray, ad: np.ndarray, time: np.ndarray) -> np.ndarray:
        """Which of a day's impressions keep within the frequency caps, earliest first: at most
        ``frequency_cap`` of one ad and ``advertiser_frequency_cap`` of one advertiser's ads to
        one user."""
        c = self.cfg
        keep = ad >= 0
        advertiser = self.camp_advertiser[self.ad_campaign[np.maximum(ad, 0)]]
        for entity, cap in ((ad, c.frequency_cap), (advertiser, c.advertiser_frequency_cap)):
            idx = np.flatnonzero(keep)
            order = idx[np.lexsort((time[idx], entity[idx], user[idx]))]
            group = np.r_[
                True,
                (user[order][1:] != user[order][:-1]) | (entity[order][1:] != entity[order][:-1]),
            ]
            pos = np.arange(len(order))
            rank = pos - np.maximum.accumulate(np.where(group, pos, 0))
            keep[order[rank >= cap]] = False
        return keep

    def _events_table(
        self,
        chunk: int,
        cols: dict[str, list[np.ndarray]],
        user_ids: np.ndarray,
        query_texts: list[str],
    ) -> pa.Table:
        cat = {
            k: np.concatenate(v) if v else np.empty(0, _EVENT_COLUMNS[k]) for k, v in cols.items()
        }
        order = np.lexsort((cat["kind"], cat["t"], cat["user"]))
        cat = {k: v[order] for k, v in cat.items()}
        n = len(order)
        event_id = (np.int64(chunk) << 36) + np.arange(n, dtype=np.int64)
        # The impression an ad event belongs to, by its shared key; clicks and conversions
        # point at the event that caused them (click -> impression, conversion -> click).
        key = cat["ad_key"]
        cause = np.full(n, -1, np.int64)
        for child, parent in (("click", "impression"), ("conversion", "click")):
            p_idx = np.flatnonzero(cat["kind"] == _KIND[parent])
            c_idx = np.flatnonzero(cat["kind"] == _KIND[child])
            p_key, c_key = key[p_idx], key[c_idx]
            srt = np.argsort(p_key, kind="stable")
            pos = srt[np.searchsorted(p_key[srt], c_key)]
            cause[c_idx] = event_id[p_idx[pos]]
        day = np.floor(cat["t"] / _SECONDS_PER_DAY).astype(np.int16)

        def nullable(values: np.ndarray, typ: pa.DataType) -> pa.Array:
            return pa.array(values, type=typ, mask=values < 0)

        kinds = np.array(list(_KIND))
        actions = np.array(list(_ACTION))
        return pa.table(
            {
                "event_id": event_id,
                "user_id": user_ids[cat["user"]],
                "session_id": cat["session"],
                "event_ts": _ts(self.start_us, cat["t"]),
                "arrival_ts": _ts(self.start_us, cat["arrival"]),
                "day": day,
                "surface": pa.array(np.array(SURFACES)[cat["surface"]]),
                "event_type": pa.array(kinds[cat["kind"]]),
                "action_type": pa.array(actions[cat["action"]]),
                "item_id": nullable(cat["item"], pa.int64()),
                "ad_id": nullable(cat["ad"], pa.int64()),
                "campaign_id": nullable(cat["campaign"], pa.int64()),
                "advertiser_id": nullable(cat["advertiser"], pa.int64()),
                "caused_by_event_id": nullable(cause, pa.int64()),
                "query": pa.array(
                    np.array([*query_texts, ""], dtype=object)[cat["query"]],
                    type=pa.string(),
                    mask=cat["query"] < 0,
                ),
                "context_item_id": nullable(cat["context"], pa.int64()),
                "true_intent_category": pa.array(
                    np.array(CATEGORIES, dtype=object)[cat["intent"]], type=pa.string()
                ),
                "true_p_click": pa.array(cat["p_click"], mask=cat["p_click"] < 0),
                "true_p_conversion": pa.array(cat["p_conv"], mask=cat["p_conv"] < 0),
            }
        )


_KIND: Final = {"engage": 0, "impression": 1, "click": 2, "conversion": 3}
_ACTION: Final = {
    **{a: i for i, a in enumerate(ORGANIC_ACTIONS)},
    "impression": 3,
    "click": 4,
    "conversion": 5,
}
_EVENT_COLUMNS: Final = {
    "user": np.int64,
    "session": np.int64,
    "t": np.float64,
    "arrival": np.float64,
    "surface": np.int64,
    "kind": np.int8,
    "action": np.int8,
    "item": np.int64,
    "ad": np.int64,
    "campaign": np.int64,
    "advertiser": np.int64,
    "p_click": np.float32,
    "p_conv": np.float32,
    "intent": np.int16,
    "query": np.int64,
    "context": np.int64,
    "ad_key": np.int64,
}


def _within_session_offsets(
    rng: np.random.Generator, sess: np.ndarray, mean_gap: float
) -> np.ndarray:
    """Increasing offsets (seconds) for events grouped by session (``sess`` sorted)."""
    if len(sess) == 0:
        return np.zeros(0)
    gaps = rng.exponential(mean_gap, len(sess)) + 1.0
    total = np.cumsum(gaps)
    first = np.r_[True, sess[1:] != sess[:-1]]
    return total - np.maximum.accumulate(np.where(first, total - gaps, 0.0))


def surfaces_table() -> pa.Table:
    """The three surfaces a request can come from."""
    return pa.table(
        {
            "surface_id": np.arange(len(SURFACES), dtype=np.int16),
            "surface": list(SURFACES),
            "description": [
                "home feed: no query, the user's interests alone",
                "search results: a query names the intent",
                "related items: a context item the user is looking at",
            ],
        }
    )


def snapshot_hash(root: Path, tables: Iterable[str] | None = None) -> str:
    """A content hash of parquet files under ``root`` (path and bytes), in path order.

    Args:
        root: the folder.
        tables: hash only ``root/<name>.parquet`` for these names (default: every parquet file).
    """
    h = hashlib.sha256()
    paths = root.rglob("*.parquet") if tables is None else (root / f"{t}.parquet" for t in tables)
    for path in sorted(paths):
        h.update(str(path.relative_to(root)).encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def generate(
    config: SynthConfig, out_dir: Path | str, overwrite: bool = False, progress: bool = True
) -> SynthSummary:
    """Writes a whole marketplace to ``out_dir``.

    The files are written into a temporary sibling folder that replaces ``out_dir`` only when
    generation has finished, so an interrupted run never leaves a half-written data set.

    Args:
        config: sizes and behaviour.
        out_dir: the folder to create.
        overwrite: replace ``out_dir`` if it already holds files.
        progress: show a progress bar on stderr.

    Returns:
        Row counts and the snapshot hash.

    Raises:
        ConfigError: ``out_dir`` is not empty and ``overwrite`` is false.
    """
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError("out", f"{out_dir} exists and is not empty; pass --overwrite to replace")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        summary = _generate_into(config, tmp, progress)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.out_dir = out_dir
    return summary


def _generate_into(config: SynthConfig, out: Path, progress: bool) -> SynthSummary:
    gen = MarketplaceGenerator(config)
    summary = SynthSummary(out_dir=out)
    advertisers = gen.advertisers()
    gen.draw_campaigns()
    _write(advertisers, out / "advertisers.parquet")
    _write(surfaces_table(), out / "surfaces.parquet")
    summary.rows["advertisers"] = advertisers.num_rows
    summary.rows["ads"] = gen.ads(out)
    plan = gen.delivery_plan()
    campaigns = gen.campaigns_table()
    _write(campaigns, out / "campaigns.parquet")
    _write(plan, out / "delivery_plan.parquet")
    summary.rows["campaigns"] = campaigns.num_rows
    summary.rows["delivery_plan"] = plan.num_rows
    summary.rows["items"] = gen.items(out)
    summary.rows["surfaces"] = len(SURFACES)

    n_chunks = math.ceil(config.users / config.chunk_users)
    users_writer = truth_writer = hidden_writer = None
    hidden = 0
    events = 0
    by_type: dict[str, int] = dict.fromkeys(_KIND, 0)
    (out / "events").mkdir()
    (out / "truth").mkdir(exist_ok=True)
    bar = tqdm(total=config.users, desc="synth users", unit="user", disable=not progress)
    try:
        for chunk in range(n_chunks):
            lo = chunk * config.chunk_users
            hi = min(config.users, lo + config.chunk_users)
            users, truth, state = gen.user_chunk(chunk, lo, hi)
            if users_writer is None:
                users_writer = pq.ParquetWriter(out / "users.parquet", users.schema)
                truth_writer = pq.ParquetWriter(out / "truth" / "users.parquet", truth.schema)
            users_writer.write_table(users)
            assert truth_writer is not None
            truth_writer.write_table(truth)
            hides = gen.hidden_chunk(chunk, state)
            if hidden_writer is None:
                hidden_writer = pq.ParquetWriter(out / "hidden_advertisers.parquet", hides.schema)
            hidden_writer.write_table(hides)
            hidden += hides.num_rows
            table = gen.events_chunk(chunk, state)
            pq.write_table(table, out / "events" / f"part-{chunk:05d}.parquet", compression="zstd")
            events += table.num_rows
            types, counts = np.unique(
                table.column("event_type").to_numpy(zero_copy_only=False), return_counts=True
            )
            for t, k in zip(types, counts, strict=True):
                by_type[str(t)] += int(k)
            bar.update(hi - lo)
            bar.set_postfix(events=f"{events:,}")
    finally:
        bar.close()
        for w in (users_writer, truth_writer, hidden_writer):
            if w is not None:
                w.close()
    summary.rows["users"] = config.users
    summary.rows["hidden_advertisers"] = hidden
    summary.rows["events"] = events
    summary.events_by_type = by_type
    summary.snapshot = snapshot_hash(out)
    manifest = {
        "kind": "candgen.synthetic_marketplace",
        "config": dataclasses.asdict(config),
        "rows": summary.rows,
        "events_by_type": by_type,
        "snapshot": summary.snapshot,
        "ad_id_offset": AD_ID_OFFSET,
        "surfaces": list(SURFACES),
        "categories": list(CATEGORIES[: config.categories]),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return summary
