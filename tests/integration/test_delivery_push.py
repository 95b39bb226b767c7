"""Live delivery state pushed into a real Feast store (SQLite and the Redis at 127.0.0.1:6379):
campaign changes reach the campaign's record and its shard, impressions count per day, hides
accumulate, and a bad push writes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from candgen.data.targeting import targeting_lists
from candgen.errors import ConfigError
from candgen.features.delivery import (
    CampaignUpdate,
    Impression,
    push_campaign_updates,
    push_hidden_advertisers,
    push_impressions,
)
from candgen.features.store import StoreConfig, online_features, open_store
from candgen.vocab import DELIVERY_SHARDS
from tests.stores import applied_store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def store_cfg(
    request: pytest.FixtureRequest, features_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StoreConfig]:
    with applied_store(request.param, features_dir, tmp_path_factory, "delivery") as cfg:
        yield cfg


def _shards(store_cfg: StoreConfig) -> dict[str, list]:
    return online_features(
        open_store(store_cfg),
        [{"delivery_shard_id": s} for s in range(DELIVERY_SHARDS)],
        "delivery_shards_v1",
    )


def _entry(shards: dict[str, list], campaign_id: int) -> tuple[str, float, int] | None:
    s = campaign_id % DELIVERY_SHARDS
    for c, status, throttle, mask in zip(
        shards["campaign_ids"][s],
        shards["statuses"][s],
        shards["throttles"][s],
        shards["targeting_masks"][s],
        strict=True,
    ):
        if c == campaign_id:
            return status, throttle, mask
    return None


def _active_campaign(features_dir: Path) -> int:
    delivery = pd.read_parquet(features_dir / "campaign_delivery.parquet")
    last = delivery.sort_values("event_timestamp").groupby("campaign_id").last()
    return int(last.index[(last["status"] == "active") & (last["throttle"] == 1.0)][0])


def test_the_materialized_shards_hold_the_offline_snapshot(
    store_cfg: StoreConfig, features_dir: Path
) -> None:
    offline = pd.read_parquet(features_dir / "delivery_shard.parquet").set_index(
        "delivery_shard_id"
    )
    online = _shards(store_cfg)
    for s in range(DELIVERY_SHARDS):
        assert list(online["campaign_ids"][s]) == list(offline.loc[s, "campaign_ids"])
        assert online["version"][s] == offline.loc[s, "version"] > 0  # milliseconds


def test_a_pause_reaches_the_campaign_and_only_its_shard(
    store_cfg: StoreConfig, features_dir: Path
) -> None:
    store = open_store(store_cfg)
    cid = _active_campaign(features_dir)
    before = _shards(store_cfg)
    assert _entry(before, cid) is None
    done = push_campaign_updates(store, [CampaignUpdate(cid, status="paused")])
    assert done == {"campaigns": [cid], "shards": [cid % DELIVERY_SHARDS]}
    after = _shards(store_cfg)
    assert _entry(after, cid) is not None and _entry(after, cid)[0] == "paused"
    moved = [s for s in range(DELIVERY_SHARDS) if after["version"][s] != before["version"][s]]
    assert moved == [cid % DELIVERY_SHARDS]
    record = online_features(store, [{"campaign_id": cid}], "campaign_delivery_v1")
    assert record["status"] == ["paused"]
    # resumed and retargeted: still listed (the export may hold the pause), now active
    push_campaign_updates(
        store,
        [CampaignUpdate(cid, status="active", targeting={"target_countries": ["DE", "FR"]})],
    )
    status, throttle, mask = _entry(_shards(store_cfg), cid)
    assert status == "active" and throttle == 1.0
    assert targeting_lists(mask)["target_countries"] == ["DE", "FR"]
    record = online_features(store, [{"campaign_id": cid}], "campaign_delivery_v1")
    assert list(record["target_countries"][0]) == ["DE", "FR"]


def test_a_bad_push_names_the_campaign_and_field_and_writes_nothing(
    store_cfg: StoreConfig, features_dir: Path
) -> None:
    store = open_store(store_cfg)
    before = _shards(store_cfg)["version"]
    with pytest.raises(ConfigError) as err:
        push_campaign_updates(store, [CampaignUpdate(987_654, status="paused")])
    assert err.value.field == "campaign_id" and "campaign 987654: unknown" in str(err.value)
    assert _shards(store_cfg)["version"] == before


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"status": "stopped"}, "status", "campaign 5: must be one of"),
        ({"throttle": 1.5}, "throttle", "campaign 5: must be in [0, 1]"),
        ({"daily_budget": -3.0}, "daily_budget", "campaign 5: must be a positive amount"),
        ({"pacing": "fast"}, "pacing", "campaign 5: must be one of"),
        ({"targeting": {"target_planets": ["Mars"]}}, "targeting", "campaign 5: unknown field"),
        ({"targeting": {"target_devices": ["tv"]}}, "target_devices", "campaign 5: unknown value"),
        ({"timestamp": datetime(2026, 1, 1)}, "timestamp", "campaign 5: must be a timezone"),
    ],
)
def test_a_malformed_update_is_refused_before_any_push(
    kwargs: dict, field: str, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        CampaignUpdate(5, **kwargs)
    assert err.value.field == field and message in str(err.value)


def test_impressions_count_per_day_and_hides_accumulate(store_cfg: StoreConfig) -> None:
    store = open_store(store_cfg)
    user, ad, other = 987_001, 1_000_000_007, 1_000_000_008
    day = datetime(2027, 3, 1, 9, tzinfo=UTC)
    push_impressions(store, [Impression(user, ad, 4, day), Impression(user, other, 4, day)])
    push_impressions(store, [Impression(user, ad, 4, day + timedelta(hours=1))])
    got = online_features(store, [{"user_id": user}], "user_serving_v3")
    counts = dict(zip(got["impressed_ad_ids"][0], got["ad_impression_counts"][0], strict=True))
    assert counts == {ad: 2, other: 1} and got["impression_day"] == ["2027-03-01"]
    assert list(got["advertiser_impression_counts"][0]) == [3]
    push_impressions(store, [Impression(user, other, 4, day + timedelta(days=1))])
    got = online_features(store, [{"user_id": user}], "user_serving_v3")
    assert list(got["impressed_ad_ids"][0]) == [other] and got["impression_day"] == ["2027-03-02"]
    push_hidden_advertisers(store, [(user, 9), (user, 4)])
    push_hidden_advertisers(store, [(user, 9)])
    got = online_features(store, [{"user_id": user}], "user_serving_v3")
    assert list(got["hidden_advertiser_ids"][0]) == [9, 4]
    with pytest.raises(ConfigError, match=r"^advertiser_id: user 3: must be a positive"):
        push_hidden_advertisers(store, [(3, 0)])


def test_the_cli_pushes_a_pause_and_a_hide(
    store_cfg: StoreConfig, features_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    from candgen.cli import main

    where = ["--features-dir", str(store_cfg.features_dir), "--state-dir",
             str(store_cfg.state_dir), "--online", store_cfg.online, "--project",
             store_cfg.project]  # fmt: skip
    delivery = pd.read_parquet(features_dir / "campaign_delivery.parquet")
    cid = int(delivery["campaign_id"].max())
    assert main(["features", "campaign", "--campaign-id", str(cid), "--status", "paused",
                 "--target-surfaces", "search", *where]) == 0  # fmt: skip
    assert '"shards"' in capsys.readouterr().out
    record = online_features(open_store(store_cfg), [{"campaign_id": cid}], "campaign_delivery_v1")
    assert record["status"] == ["paused"] and list(record["target_surfaces"][0]) == ["search"]
    assert main(["features", "hide", "--user-id", "987002", "--advertiser-id", "5", *where]) == 0
    got = online_features(open_store(store_cfg), [{"user_id": 987_002}], "user_serving_v3")
    assert list(got["hidden_advertiser_ids"][0]) == [5]
