"""A real Feast store on the small marketplace: SQLite and the Redis at 127.0.0.1:6379."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from candgen.data.synth import SynthSummary
from candgen.errors import CandgenError, ConfigError
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
from tests.stores import applied_store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def store_cfg(
    request: pytest.FixtureRequest, features_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StoreConfig]:
    with applied_store(request.param, features_dir, tmp_path_factory, "test") as cfg:
        yield cfg


def _latest(features_dir: Path, table: str, key: str) -> pd.DataFrame:
    df = pd.read_parquet(features_dir / f"{table}.parquet")
    return df.sort_values("event_timestamp").groupby(key).tail(1).set_index(key)


def test_online_values_equal_the_newest_offline_rows(
    store_cfg: StoreConfig, features_dir: Path
) -> None:
    store = open_store(store_cfg)
    short = _latest(features_dir, "user_short_term", "user_id")
    users = [int(u) for u in short.index[:5]]
    got = online_features(store, [{"user_id": u} for u in users])
    for i, u in enumerate(users):
        assert list(got["recent_item_ids"][i]) == list(short.loc[u, "recent_item_ids"])
        assert list(got["recent_action_types"][i]) == list(short.loc[u, "recent_action_types"])
    profile = pd.read_parquet(features_dir / "user_profile.parquet").set_index("user_id")
    assert got["country"] == [profile.loc[u, "country"] for u in users]
    delivery = _latest(features_dir, "ad_delivery", "ad_id")
    ads = [int(a) for a in delivery.index[:5]]
    got_ads = online_features(store, [{"ad_id": a} for a in ads], "ad_features_v1")
    assert got_ads["status"] == [delivery.loc[a, "status"] for a in ads]
    assert all(len(e) == 384 for e in got_ads["text_embedding"])


def test_unknown_user_comes_back_empty_not_an_error(store_cfg: StoreConfig) -> None:
    got = online_features(open_store(store_cfg), [{"user_id": 987_654_321}])
    assert got["recent_item_ids"] == [None]
    assert got["country"] == [None]


def test_push_appends_to_the_short_term_sequence(
    store_cfg: StoreConfig, features_dir: Path
) -> None:
    store = open_store(store_cfg)
    short = _latest(features_dir, "user_short_term", "user_id")
    user = int(short.index[-1])
    before = list(short.loc[user, "recent_item_ids"])
    t = datetime(2030, 1, 1, tzinfo=UTC)
    push_engagements(
        store,
        [
            Engagement(user, 1_000_000_007, "click", "search", t + timedelta(seconds=1)),
            Engagement(user, 17, "view", "home", t),
        ],
        max_len=8,
    )
    row = online_features(store, [{"user_id": user}])
    ids = list(row["recent_item_ids"][0])
    assert ids[-2:] == [17, 1_000_000_007]  # in time order, newest last
    assert ids == [*before, 17, 1_000_000_007][-8:]
    assert list(row["recent_action_types"][0])[-2:] == ["view", "click"]
    assert list(row["recent_surfaces"][0])[-1] == "search"
    # A push for a user the store has never seen starts a sequence.
    push_engagements(store, [Engagement(555_555_555, 3, "like", "related", t)])
    fresh = online_features(store, [{"user_id": 555_555_555}])
    assert list(fresh["recent_item_ids"][0]) == [3]


def test_materialize_again_is_incremental(store_cfg: StoreConfig) -> None:
    end = materialize(store_cfg)
    views = open_store(store_cfg).list_feature_views()
    assert all(v.most_recent_end_time is not None for v in views)
    assert max(v.most_recent_end_time for v in views) <= end + timedelta(seconds=1)


def test_training_set_never_joins_a_later_feature_value(
    features_dir: Path, marketplace: SynthSummary, tmp_path: Path
) -> None:
    cfg = StoreConfig(features_dir=features_dir, state_dir=tmp_path / "state")
    apply(cfg)  # the offline join needs the registry, not the online store
    rows = label_rows(marketplace.out_dir, "click").sample(1_500, random_state=1)
    ts = training_set(open_store(cfg), rows)
    assert len(ts) == len(rows)
    stamp = ts["event_timestamp"].astype("int64") // 10**6
    newest = ts["recent_timestamps"].map(lambda v: max(v) if v is not None and len(v) else -1)
    assert (newest <= stamp).all()
    assert (newest > 0).mean() > 0.5  # most impressions do have an earlier sequence


def test_the_training_set_command_writes_a_sample(
    features_dir: Path, marketplace: SynthSummary, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import json

    from candgen.cli import main

    cfg = StoreConfig(features_dir=features_dir, state_dir=tmp_path / "state")
    apply(cfg)
    out = tmp_path / "ts.parquet"
    argv = ["features", "training-set", "--data", str(marketplace.out_dir), "--features-dir",
            str(features_dir), "--state-dir", str(tmp_path / "state"), "--limit", "200",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 200 == len(pd.read_parquet(out))
    assert main([*argv[:-4], "--limit", "-1", "--out", str(out)]) == 2
    assert "limit: must be >= 0" in capsys.readouterr().err


def test_point_in_time_join_with_a_planted_later_value(features_dir: Path, tmp_path: Path) -> None:
    # Copy the tables and plant two short-term rows for one user: one a second before the label
    # and one a second after it. The join must return the earlier one, and the later one only
    # for a label that comes after it.
    planted = tmp_path / "features"
    shutil.copytree(features_dir, planted)
    short = pq.read_table(planted / "user_short_term.parquet").to_pandas()
    user = int(short["user_id"].iloc[0])
    label_ts = pd.Timestamp("2026-01-20T12:00:00", tz="UTC")

    def row(offset_s: int, marker: int) -> dict:
        t = label_ts + pd.Timedelta(seconds=offset_s)
        return {
            "user_id": user,
            "event_timestamp": t,
            "recent_item_ids": [marker],
            "recent_action_types": ["view"],
            "recent_surfaces": ["home"],
            "recent_timestamps": [int(t.timestamp())],
        }

    short = pd.concat([short, pd.DataFrame([row(-1, 111), row(1, 999)])], ignore_index=True)
    pq.write_table(
        pa.Table.from_pandas(short, preserve_index=False), planted / "user_short_term.parquet"
    )
    cfg = StoreConfig(features_dir=planted, state_dir=tmp_path / "state", project="pit_test")
    apply(cfg)
    entity_df = pd.DataFrame(
        {
            "user_id": [user, user, user],
            "event_timestamp": [
                label_ts,
                label_ts + pd.Timedelta(seconds=1),
                label_ts + pd.Timedelta(seconds=2),
            ],
        }
    )
    got = training_set(open_store(cfg), entity_df, "user_features_v1").sort_values(
        "event_timestamp"
    )
    assert [list(v) for v in got["recent_item_ids"]] == [[111], [999], [999]]


def test_apply_without_feature_tables_says_what_to_run(tmp_path: Path) -> None:
    cfg = StoreConfig(features_dir=tmp_path / "nothing", state_dir=tmp_path / "state")
    with pytest.raises(CandgenError, match="candgen features build"):
        apply(cfg)


def test_materialize_before_apply_is_refused(features_dir: Path, tmp_path: Path) -> None:
    cfg = StoreConfig(features_dir=features_dir, state_dir=tmp_path / "state")
    with pytest.raises(CandgenError, match="candgen features apply"):
        materialize(cfg)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"user_id": 0}, "user_id"),
        ({"item_id": -4}, "item_id"),
        ({"action_type": "purchase"}, "action_type"),
        ({"surface": "inbox"}, "surface"),
        ({"timestamp": datetime(2026, 1, 1)}, "timestamp"),
    ],
)
def test_bad_engagement_names_the_field(kwargs: dict, field: str) -> None:
    base = dict(
        user_id=1,
        item_id=2,
        action_type="view",
        surface="home",
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
    )
    with pytest.raises(ConfigError) as err:
        Engagement(**{**base, **kwargs})
    assert err.value.field == field


def test_bad_store_config_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^online: "):
        StoreConfig(online="cassandra")
    with pytest.raises(ConfigError, match=r"^project: "):
        StoreConfig(project="has space")
    with pytest.raises(ConfigError, match=r"^repo_dir: "):
        StoreConfig(repo_dir=tmp_path)


def test_publishing_before_apply_is_a_clear_error(tmp_path: Path) -> None:
    from candgen.features.store import publish

    with pytest.raises(CandgenError, match=r"^state_dir: .*apply and materialize first"):
        publish(StoreConfig(state_dir=tmp_path / "empty"), tmp_path / "claim")
    assert not (tmp_path / "claim" / "registry.db").exists()
