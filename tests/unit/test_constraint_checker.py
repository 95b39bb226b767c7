"""The independent constraint checker catches each kind of violation it is there to catch."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from candgen.data.synth import SynthSummary
from candgen.evaluation.constraints import ConstraintChecker


def test_the_checker_flags_planted_violations(
    marketplace: SynthSummary, features_dir: Path
) -> None:
    checker = ConstraintChecker.from_dirs(marketplace.out_dir, features_dir)
    campaigns = pd.read_parquet(marketplace.out_dir / "campaigns.parquet")
    users = pd.read_parquet(marketplace.out_dir / "users.parquet")
    ads = pd.read_parquet(marketplace.out_dir / "ads.parquet")
    targeted = campaigns[campaigns["target_countries"].map(len) == 1].iloc[0]
    user = int(users[users["country"] != targeted["target_countries"][0]]["user_id"].iloc[0])
    ad = int(ads[ads["campaign_id"] == targeted["campaign_id"]]["ad_id"].iloc[0])
    assert any("targeting country" in v for v in checker.check(user, "home", 1, [ad]).violations)

    free = campaigns[
        campaigns[["target_countries", "target_age_buckets", "target_devices", "target_surfaces"]]
        .map(len)
        .sum(axis=1)
        == 0
    ]
    open_ads = ads[ads["campaign_id"].isin(free["campaign_id"])]
    ok = [a for a in open_ads["ad_id"].tolist() if not checker._reasons(user, "home", a)]
    assert ok, "the small marketplace has ads open to everyone"
    plain = ok[0]
    assert checker.check(user, "home", 1, [plain]).violations == []
    campaign = checker.campaign[plain]
    checker.set_status(campaign, "paused")
    assert checker.check(user, "home", 1, [plain]).violations == [f"{plain}: status paused"]
    checker.set_status(campaign, "active")
    checker.hide(user, checker.advertiser[plain])
    assert checker.check(user, "home", 1, [plain]).violations == [f"{plain}: hidden advertiser"]
    other = 987_654_000 + user
    checker.show(other, [plain] * 3)
    assert checker.check(other, "home", 1, [plain]).violations[-1].endswith("frequency cap")

    crowd = ads.groupby("advertiser_id")["ad_id"].agg(list)
    many = next(a for a in crowd if len(a) >= 4)[:4]
    found = checker.check(user, "home", 20, many).violations
    assert any(v.startswith("top 20: 4 of one advertiser") for v in found)
    # an empty answer while ads are eligible is short
    assert checker.check(user, "home", 5, []).short
