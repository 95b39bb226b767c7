"""Per-request eligibility inside retrieval: targeting x profile x surface, status, throttle,
frequency caps and hidden advertisers, as bitmaps that the ANN search stays inside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from candgen.data.targeting import EVERYONE, reaches, targeting_mask
from candgen.errors import CandgenError, DataFormatError
from candgen.index.ann import AdIndex, IndexConfig
from candgen.serving.eligibility import (
    AdTable,
    DeliveryState,
    Eligibility,
    caps_from_features,
    load_eligibility,
    save_eligibility,
)

AD = 1_000_000_000
PROFILE = {"country": "US", "age_bucket": "25-34", "device": "ios", "surface": "home"}
TARGETS = [
    {},
    {"target_countries": ["US"]},
    {"target_countries": ["DE"]},
    {"target_age_buckets": ["25-34", "35-44"]},
    {"target_surfaces": ["search"]},
    {"target_devices": ["android", "web"]},
]


def _world(
    n_ads: int = 600, kind: str = "flat", filter_mode: str = "auto"
) -> tuple[AdIndex, AdTable, DeliveryState]:
    rng = np.random.default_rng(0)
    n_camps = 60
    masks = np.array([targeting_mask(TARGETS[c % len(TARGETS)], c + 1) for c in range(n_camps)])
    state = DeliveryState(
        np.arange(1, n_camps + 1, dtype=np.int64),
        masks.astype(np.int64),
        np.ones(n_camps, bool),
        np.ones(n_camps, np.float32),
    )
    ad_ids = AD + np.arange(1, n_ads + 1, dtype=np.int64)
    campaigns = rng.integers(1, n_camps + 1, n_ads).astype(np.int64)
    ads = AdTable(ad_ids, campaigns, (campaigns - 1) // 6 + 1, np.array([ad_ids[5]]))
    vectors = rng.standard_normal((n_ads, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = AdIndex.build(ad_ids, vectors, IndexConfig(kind=kind, filter_mode=filter_mode))
    return index, ads, state


def _allowed_by_rule(ads: AdTable, state: DeliveryState, profile: dict) -> set[int]:
    camp_ok = reaches(state.masks, profile) & state.active & (state.throttles >= 1)
    ok = camp_ok[ads.campaign_ids - 1] & ~np.isin(ads.ad_ids, ads.ineligible)
    return set(ads.ad_ids[ok].tolist())


# overfetch: how a GPU index keeps to the bitmap (run here on the CPU)
@pytest.mark.parametrize(("kind", "filter_mode"),
                         [("flat", "auto"), ("hnsw", "auto"), ("flat", "overfetch")])  # fmt: skip
def test_answers_hold_only_ads_the_request_may_get(kind: str, filter_mode: str) -> None:
    index, ads, state = _world(kind=kind, filter_mode=filter_mode)
    elig = Eligibility(ads, state, {"ads": index})
    allowed = _allowed_by_rule(ads, state, PROFILE)
    assert 0.2 < len(allowed) / len(ads.ad_ids) < 0.8
    request = elig.request(PROFILE, blocked_ads=[min(allowed)], blocked_advertisers=[1])
    allowed -= {min(allowed)}
    allowed -= set(ads.ad_ids[ads.advertiser_ids == 1].tolist())
    queries = np.random.default_rng(1).standard_normal((10, 16)).astype(np.float32)
    found, _ = index.search(queries, 50, allowed=request.bitmap("ads"))
    for row in found:
        assert len(row) == 50 and set(row.tolist()) <= allowed
    # everything allowed comes back when K exceeds it: never short, never padded
    every, _ = index.search(queries[:1], len(ads.ad_ids), allowed=request.bitmap("ads"))
    assert set(every[0].tolist()) == allowed
    assert request.allows(ads.ad_ids).tolist() == [a in allowed for a in ads.ad_ids.tolist()]


def test_a_paused_or_throttled_campaign_leaves_from_the_next_request() -> None:
    index, ads, state = _world()
    elig = Eligibility(ads, state, {"ads": index})
    campaign = int(ads.campaign_ids[0])
    mask = int(state.masks[campaign - 1])
    elig.update(state.updated([(campaign, "active", 1.0, EVERYONE)]))
    mine = ads.ad_ids[ads.campaign_ids == campaign]
    assert elig.request(PROFILE).allows(mine[mine != ads.ineligible[0]]).all()
    elig.update(elig.state.updated([(campaign, "paused", 1.0, mask)]))
    assert elig.state.version == 2
    assert not elig.request(PROFILE).allows(mine).any()
    elig.update(elig.state.updated([(campaign, "active", 0.0, EVERYONE)]))
    assert not elig.request(PROFILE).allows(mine).any()  # throttled to nothing
    elig.update(elig.state.updated([(campaign, "active", 1.0, EVERYONE)]))
    assert elig.request(PROFILE).allows(mine[mine != ads.ineligible[0]]).all()
    # a campaign the export does not know is skipped, not an error
    assert elig.state.updated([(99_999, "paused", 1.0, 0)]).version == elig.state.version + 1


def test_a_throttle_passes_about_its_share_of_segments() -> None:
    index, ads, state = _world()
    n = len(state.masks)
    throttled = DeliveryState(
        state.campaign_ids, np.full(n, EVERYONE), state.active, np.full(n, 0.3, np.float32)
    )
    elig = Eligibility(ads, throttled, {"ads": index}, seed=4)
    shares = []
    for country in ("US", "GB", "DE", "FR", "JP", "BR", "IN", "CA"):
        for surface in ("home", "search", "related"):
            profile = {**PROFILE, "country": country, "surface": surface}
            shares.append(elig.request(profile).allows(ads.ad_ids).mean())
            # the same segment and state: the same answer (replicas and replays agree)
            assert (elig.request(profile).allows(ads.ad_ids).mean()) == shares[-1]
    assert 0.2 < float(np.mean(shares)) < 0.4
    elig.update(DeliveryState(throttled.campaign_ids, throttled.masks, throttled.active,
                              throttled.throttles, version=7))  # fmt: skip
    assert elig.request({**PROFILE, "country": "CA"}).allows(ads.ad_ids).mean() == shares[-3]


def test_a_user_without_a_profile_gets_only_untargeted_campaigns() -> None:
    index, ads, state = _world()
    elig = Eligibility(ads, state, {"ads": index})
    nobody = {"country": None, "age_bucket": None, "device": None, "surface": "home"}
    ok = elig.request(nobody).allows(ads.ad_ids)
    targeted = np.array([bool(TARGETS[(c - 1) % len(TARGETS)]) for c in ads.campaign_ids])
    surface_only = np.array(
        [list(TARGETS[(c - 1) % len(TARGETS)]) == ["target_surfaces"] for c in ads.campaign_ids]
    )
    assert not ok[targeted & ~surface_only].any()
    assert ok[~targeted & ~np.isin(ads.ad_ids, ads.ineligible)].all()


def test_caps_count_only_today_and_hidden_advertisers_always() -> None:
    features = {
        "impression_day": "2027-03-01",
        "impressed_ad_ids": [AD + 1, AD + 2],
        "ad_impression_counts": [3, 1],
        "impressed_advertiser_ids": [7, 8],
        "advertiser_impression_counts": [10, 2],
        "hidden_advertiser_ids": [9],
    }
    assert caps_from_features(features, "2027-03-01", 3, 10) == ([AD + 1], [7, 9])
    assert caps_from_features(features, "2027-03-02", 3, 10) == ([], [9])
    assert caps_from_features(None, "2027-03-02", 3, 10) == ([], [])


def test_the_file_round_trips_and_a_malformed_one_names_the_array(tmp_path: Path) -> None:
    _, ads, state = _world(50)
    save_eligibility(tmp_path, ads, state)
    got_ads, got_state = load_eligibility(tmp_path)
    assert got_ads.ad_ids.tolist() == ads.ad_ids.tolist()
    assert got_state.masks.tolist() == state.masks.tolist()
    np.savez(tmp_path / "eligibility.npz", ad_ids=ads.ad_ids)
    with pytest.raises(DataFormatError, match="ad_campaign_ids: missing"):
        load_eligibility(tmp_path)
    with pytest.raises(CandgenError, match="re-export the version"):
        load_eligibility(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("status", "stopped", "campaign 2: must be one of"),
        ("throttle", 1.5, "campaign 2: must be in [0, 1]"),
        ("throttle", float("nan"), "campaign 2: must be in [0, 1]"),
        ("target_devices", ["tv"], "campaign 2: unknown value(s) ['tv']"),
    ],
)
def test_export_refuses_a_malformed_delivery_state_naming_campaign_and_field(
    column: str, value: object, message: str
) -> None:
    import pandas as pd

    from candgen.endpoint.export import delivery_state
    from candgen.errors import ConfigError

    rows = pd.DataFrame({
        "campaign_id": [1, 2], "event_timestamp": pd.to_datetime([1, 2], unit="s", utc=True),
        "status": ["active", "paused"], "throttle": [1.0, 0.5],
        "target_countries": [[], ["US"]], "target_age_buckets": [[], []],
        "target_devices": [[], []], "target_surfaces": [[], []],
    })  # fmt: skip
    assert delivery_state(rows).active.tolist() == [True, False]
    rows[column] = rows[column].astype(object)
    rows.at[1, column] = value
    with pytest.raises(ConfigError) as err:
        delivery_state(rows)
    assert err.value.field == column and message in str(err.value)


def test_bitmaps_follow_an_index_whose_positions_changed() -> None:
    index, ads, state = _world(kind="flat")
    elig = Eligibility(ads, state, {"ads": index})
    allowed = _allowed_by_rule(ads, state, PROFILE)
    query = np.ones((1, 16), np.float32)
    before = index.search(query, len(ads.ad_ids), allowed=elig.request(PROFILE).bitmap("ads"))
    assert set(before[0][0].tolist()) == allowed
    gone = sorted(allowed)[:5]
    index.remove(gone)  # a flat index compacts its positions: old bitmaps no longer line up
    after = index.search(query, len(ads.ad_ids), allowed=elig.request(PROFILE).bitmap("ads"))
    assert set(after[0][0].tolist()) == allowed - set(gone)


def test_a_patched_segment_equals_one_built_afresh() -> None:
    index, ads, state = _world(n_ads=900, kind="flat")
    elig = Eligibility(ads, state, {"ads": index}, seed=3)
    assert elig.warm() == 8 * 6 * 3 * 3 + 3
    rng = np.random.default_rng(5)
    for step in range(4):  # pauses, resumes, throttles and retargeting, applied in turn
        rows = rng.choice(len(state.campaign_ids), 12, replace=False)
        entries = [
            (int(elig.state.campaign_ids[r]), ("active", "paused")[step % 2],
             float(rng.choice([1.0, 0.4, 0.0])), int(rng.integers(0, EVERYONE + 1)))
            for r in rows
        ]  # fmt: skip
        elig.update(elig.state.updated(entries))
        fresh = Eligibility(ads, elig.state, {"ads": index}, seed=3)
        nobody = {"country": None, "age_bucket": None, "device": None, "surface": "home"}
        for profile in (PROFILE, {**PROFILE, "surface": "search", "country": "DE"}, nobody):
            patched = elig.request(profile).bitmap("ads")
            assert patched.tolist() == fresh.request(profile).bitmap("ads").tolist()


def test_indexes_laid_out_alike_share_one_bitmap_until_one_changes() -> None:
    index, ads, state = _world(kind="flat")
    twin = AdIndex.build(
        index.positions(), np.eye(16, dtype=np.float32)[np.arange(len(ads.ad_ids)) % 16],
        IndexConfig(kind="flat"),
    )  # fmt: skip
    elig = Eligibility(ads, state, {"ads": index, "content": twin})
    request = elig.request(PROFILE)
    assert request.bitmap("ads") is request.bitmap("content")
    # a pause patches the shared bitmap once, for both
    campaign = int(ads.campaign_ids[0])
    elig.update(elig.state.updated([(campaign, "paused", 1.0, EVERYONE)]))
    allowed = _allowed_by_rule(ads, elig.state, PROFILE)
    request = elig.request(PROFILE)
    assert request.bitmap("ads") is request.bitmap("content")
    query = np.ones((1, 16), np.float32)
    for name, idx in (("ads", index), ("content", twin)):
        found = idx.search(query, len(ads.ad_ids), allowed=request.bitmap(name))[0][0]
        assert set(found.tolist()) == allowed
    # the content index loses ads: its positions move, the ads index's do not
    gone = sorted(allowed)[:5]
    twin.remove(gone)
    request = elig.request(PROFILE, blocked_ads=[sorted(allowed)[7]])
    assert request.bitmap("ads") is not request.bitmap("content")
    for name, idx, left in (("ads", index, allowed), ("content", twin, allowed - set(gone))):
        found = idx.search(query, len(ads.ad_ids), allowed=request.bitmap(name))[0][0]
        assert set(found.tolist()) == left - {sorted(allowed)[7]}


def test_an_index_laid_out_unlike_the_ad_table_answers_by_the_rule() -> None:
    _, ads, state = _world(kind="flat")
    rng = np.random.default_rng(2)
    shuffled = rng.permutation(len(ads.ad_ids))
    vectors = rng.standard_normal((len(ads.ad_ids), 16)).astype(np.float32)
    index = AdIndex.build(ads.ad_ids[shuffled], vectors, IndexConfig(kind="flat"))
    elig = Eligibility(ads, state, {"ads": index})
    allowed = _allowed_by_rule(ads, state, PROFILE)
    request = elig.request(PROFILE)
    found = index.search(vectors[:1], len(ads.ad_ids), allowed=request.bitmap("ads"))[0][0]
    assert set(found.tolist()) == allowed
    assert request.allows(ads.ad_ids).tolist() == [a in allowed for a in ads.ad_ids.tolist()]
