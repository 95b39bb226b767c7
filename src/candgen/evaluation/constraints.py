"""An independent check of served answers against the ads delivery constraints.

It reads the marketplace's own tables (campaign targeting lists, users' profiles, ads' campaigns
and advertisers) and the delivery state the feature tables hold, and judges each returned ad with
plain set logic, sharing no code with the serving path's bitmaps (``candgen.serving.
eligibility``): a bug there is not repeated here. Changes pushed while a test or benchmark runs
(a pause, a hide, an impression) are told to it through ``set_status``, ``hide`` and ``show``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

TARGETS = {
    "country": "target_countries",
    "age_bucket": "target_age_buckets",
    "device": "target_devices",
}


@dataclass
class Verdict:
    """What the checker found in one answer."""

    violations: list[str] = field(default_factory=list)
    eligible: int = 0  # ads the request could get (throttled ones included; -1: not counted,
    # the answer being full)
    # fewer than K returned while K surely eligible ads (not throttled) could fill the answer
    # under the per-advertiser cap, one ad per near-duplicate group where groups are given
    short: bool = False


class ConstraintChecker:
    """Judges answers: targeting, campaign status, frequency caps, hidden advertisers and the
    per-advertiser cap (at most ``max_per_advertiser`` in the first ``window`` ads, and
    ``max_per_advertiser`` per started ``window`` of K in the whole answer).

    Args:
        campaigns: campaign_id and its targeting lists (target_countries, target_age_buckets,
            target_devices, target_surfaces; empty: everyone).
        ads: ad_id, campaign_id, advertiser_id.
        users: user_id, country, age_bucket, device.
        delivery: campaign_delivery rows (campaign_id, event_timestamp, status, throttle);
            each campaign's newest counts.
        hidden: user_hidden_advertisers rows (user_id, event_timestamp, hidden_advertiser_ids).
        frequency_cap: impressions of one ad a user may get in a day.
        advertiser_frequency_cap: impressions of one advertiser a user may get in a day.
        max_per_advertiser: at most this many ads of one advertiser per ``window`` ads.
        window: the window of that cap.
        groups: ad id -> near-duplicate group (the served catalog's): an answer holds one ad
            of each, so the short-answer count takes one per group (-1 or absent: its own).
    """

    def __init__(
        self,
        campaigns: pd.DataFrame,
        ads: pd.DataFrame,
        users: pd.DataFrame,
        delivery: pd.DataFrame,
        hidden: pd.DataFrame,
        frequency_cap: int = 3,
        advertiser_frequency_cap: int = 10,
        max_per_advertiser: int = 3,
        window: int = 20,
        groups: dict[int, int] | None = None,
    ) -> None:
        self.groups = groups or {}
        self.targets: dict[int, dict[str, set[str]]] = {}
        lists = campaigns[["campaign_id", *TARGETS.values(), "target_surfaces"]]
        for row in lists.itertuples(index=False):
            self.targets[int(row[0])] = {
                **{k: set(row[1 + i]) for i, k in enumerate(TARGETS)},
                "surface": set(row[-1]),
            }
        self.campaign = dict(zip(ads["ad_id"].tolist(), ads["campaign_id"].tolist(), strict=True))
        self.advertiser = dict(
            zip(ads["ad_id"].tolist(), ads["advertiser_id"].tolist(), strict=True)
        )
        self.profiles = {
            int(u): dict(zip(TARGETS, values, strict=True))
            for u, *values in users[["user_id", *TARGETS]].itertuples(index=False)
        }
        last = delivery.sort_values("event_timestamp", kind="stable").groupby("campaign_id").last()
        self.status = dict(zip(last.index.tolist(), last["status"].tolist(), strict=True))
        self.throttle = dict(zip(last.index.tolist(), last["throttle"].tolist(), strict=True))
        self.hidden: dict[int, set[int]] = {}
        newest = hidden.sort_values("event_timestamp").groupby("user_id").last()
        for u, a in newest["hidden_advertiser_ids"].items():
            self.hidden[int(u)] = set(map(int, a))
        self.shown: dict[int, Counter[int]] = {}
        self.caps = (frequency_cap, advertiser_frequency_cap)
        self.max_per_advertiser, self.window = max_per_advertiser, window

    @classmethod
    def from_dirs(
        cls, data_dir: Path, features_dir: Path, groups: dict[int, int] | None = None
    ) -> ConstraintChecker:
        """From a marketplace and its feature tables (the default caps and window)."""
        data_dir, features_dir = Path(data_dir), Path(features_dir)
        return cls(
            pd.read_parquet(data_dir / "campaigns.parquet"),
            pd.read_parquet(data_dir / "ads.parquet"),
            pd.read_parquet(data_dir / "users.parquet"),
            pd.read_parquet(features_dir / "campaign_delivery.parquet"),
            pd.read_parquet(features_dir / "user_hidden_advertisers.parquet"),
            groups=groups,
        )

    def set_status(self, campaign_id: int, status: str, throttle: float = 1.0) -> None:
        self.status[campaign_id] = status
        self.throttle[campaign_id] = throttle

    def hide(self, user_id: int, advertiser_id: int) -> None:
        self.hidden.setdefault(user_id, set()).add(advertiser_id)

    def show(self, user_id: int, ad_ids: Iterable[int]) -> None:
        """Impressions of today (the frequency caps count them)."""
        self.shown.setdefault(user_id, Counter()).update(ad_ids)

    def _reasons(self, user_id: int, surface: str, ad: int) -> list[str]:
        campaign = self.campaign.get(ad)
        if campaign is None:
            return ["unknown ad"]
        out = []
        profile = self.profiles.get(user_id, dict.fromkeys(TARGETS))
        targets = self.targets[campaign]
        for key, value in (*profile.items(), ("surface", surface)):
            if targets[key] and value not in targets[key]:
                out.append(f"targeting {key}")
        if self.status.get(campaign) != "active":
            out.append(f"status {self.status.get(campaign)}")
        if self.throttle.get(campaign, 1.0) <= 0.0:
            out.append("throttled to nothing")
        advertiser = self.advertiser[ad]
        if advertiser in self.hidden.get(user_id, set()):
            out.append("hidden advertiser")
        shown = self.shown.get(user_id, Counter())
        if shown[ad] >= self.caps[0]:
            out.append("frequency cap")
        by_advertiser = sum(n for a, n in shown.items() if self.advertiser.get(a) == advertiser)
        if by_advertiser >= self.caps[1]:
            out.append("advertiser frequency cap")
        return out

    def check(
        self, user_id: int, surface: str, k: int, ad_ids: Sequence[int], exclude: Iterable[int] = ()
    ) -> Verdict:
        """One answer's verdict: every ad's violations, how many ads were eligible, and whether
        the answer is short. ``exclude``: ads the request itself rules out (its history)."""
        verdict = Verdict()
        for ad in ad_ids:
            verdict.violations += [f"{ad}: {r}" for r in self._reasons(user_id, surface, ad)]
        limit = self.max_per_advertiser * math.ceil(k / self.window)
        top = Counter(self.advertiser.get(a) for a in ad_ids[: self.window])
        if max(top.values(), default=0) > self.max_per_advertiser:
            verdict.violations.append(f"top {self.window}: {max(top.values())} of one advertiser")
        whole = Counter(self.advertiser.get(a) for a in ad_ids)
        if max(whole.values(), default=0) > limit:
            verdict.violations.append(f"answer: {max(whole.values())} ads of one advertiser")
        if len(ad_ids) >= k:  # a full answer is not short: spare the scan of every ad
            verdict.eligible = -1
            return verdict
        skip = set(exclude)
        # Surely eligible: a throttled campaign may rightly sit out a request.
        eligible = [
            a
            for a in self.campaign
            if a not in skip
            and self.throttle.get(self.campaign[a], 1.0) >= 1.0
            and not self._reasons(user_id, surface, a)
        ]
        verdict.eligible = len(eligible)
        distinct = {(self.advertiser[a], self.groups.get(a, -1)) if self.groups.get(a, -1) >= 0
                    else (self.advertiser[a], -1 - a) for a in eligible}  # fmt: skip
        advertisers = Counter(adv for adv, _ in distinct)
        # What the per-advertiser cap lets an answer hold: in all, and in its first window.
        in_all = sum(min(n, limit) for n in advertisers.values())
        first = sum(min(n, self.max_per_advertiser) for n in advertisers.values())
        verdict.short = in_all >= k and first >= min(k, self.window)
        return verdict
