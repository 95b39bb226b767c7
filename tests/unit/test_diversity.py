"""Advertiser diversity in the quota merge: the per-advertiser cap, near-duplicate collapse and
the spread of an answer over its windows (pure logic)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from candgen.errors import CandgenError, ConfigError
from candgen.serving.diversity import (
    DIVERSITY_FILE,
    AdCatalog,
    Diversifier,
    DiversityConfig,
    duplicate_groups,
    spread,
)
from candgen.serving.quota import Candidate, QuotaPolicy, allocate, snake_merge

W = {"sequential": 0.6, "content": 0.25, "popularity": 0.15}
DIM = 64


def _catalog(advertisers: dict[int, int]) -> AdCatalog:
    """ad id -> advertiser, every ad in a group of its own (so never a near-duplicate)."""
    ids = np.array(sorted(advertisers), dtype=np.int64)
    adv = np.array([advertisers[i] for i in ids.tolist()], dtype=np.int64)
    return AdCatalog(ids, adv, np.arange(len(ids), dtype=np.int64))


def _unit(degrees: float) -> np.ndarray:
    """A 2-d text embedding at this angle: cosine between two is cos(their angle)."""
    rad = np.deg2rad(degrees)
    return np.array([np.cos(rad), np.sin(rad)], dtype=np.float32)


def _ranked(ids: list[int]) -> list[tuple[int, float]]:
    return [(i, 1.0 - n / 1000) for n, i in enumerate(ids)]


def _per_advertiser(chosen: list[Candidate], catalog: AdCatalog) -> Counter[int | None]:
    return Counter(catalog.advertiser(c.ad_id) for c in chosen)


# Ads 0..99 all belong to advertiser 7 (one advertiser's flood at the top of every list);
# ads 1000.. belong to one advertiser each.
FLOOD = {i: 7 for i in range(100)} | {1000 + i: 100 + i for i in range(300)}


def _flooded() -> dict[str, list[tuple[int, float]]]:
    return {
        "sequential": _ranked([*range(0, 40), *range(1000, 1100)]),
        "content": _ranked([*range(40, 70), *range(1100, 1200)]),
        "popularity": _ranked([*range(70, 100), *range(1200, 1300)]),
    }


@pytest.mark.parametrize(("k", "limit"), [(20, 3), (60, 9)])
def test_the_cap_holds_and_the_answer_is_still_full(k: int, limit: int) -> None:
    catalog = _catalog(FLOOD)
    div = Diversifier(catalog, DiversityConfig(), k)
    assert div.limit == limit
    out = allocate(_flooded(), W, k, admit=div.admit)
    assert len(out) == k and len({c.ad_id for c in out}) == k
    assert _per_advertiser(out, catalog)[7] == limit
    assert div.refused["capped"] > 0 and div.refused["duplicate"] == 0
    # Without the cap the flood takes the whole answer.
    assert _per_advertiser(allocate(_flooded(), W, k), catalog)[7] == k


def test_a_refused_slot_is_refilled_from_the_same_generators_next_candidates() -> None:
    catalog = _catalog(FLOOD)
    div = Diversifier(catalog, DiversityConfig(), 20)
    out = allocate(_flooded(), W, 20, admit=div.admit)
    sources = Counter(c.source for c in out)
    assert (sources["sequential"], sources["content"], sources["popularity"]) == (12, 5, 3)
    # The sequential list's first flood ads are kept (best first), then its own later
    # candidates of other advertisers fill its slots, in its order.
    seq = [c.ad_id for c in out if c.source == "sequential"]
    assert seq == [0, 1, 2, *range(1000, 1009)]
    assert all(catalog.advertiser(c.ad_id) != 7 for c in out if c.source != "sequential")


def test_snake_merge_and_the_policy_take_admit_too() -> None:
    catalog = _catalog(FLOOD)
    div = Diversifier(catalog, DiversityConfig(), 20)
    out = snake_merge(_flooded(), ["sequential", "content", "popularity"], 20, admit=div.admit)
    assert len(out) == 20 and _per_advertiser(out, catalog)[7] == 3
    for policy in (QuotaPolicy(), QuotaPolicy(policy="snake")):
        div = Diversifier(catalog, DiversityConfig(), 20)
        out = policy.select(_flooded(), "home", 5, 20, admit=div.admit)
        assert len(out) == 20 and _per_advertiser(out, catalog)[7] == 3


def test_fewer_results_when_only_capped_ads_are_left() -> None:
    catalog = _catalog(FLOOD)
    cands = {"sequential": _ranked(list(range(30))), "popularity": _ranked([1000, 1001])}
    div = Diversifier(catalog, DiversityConfig(), 20)
    out = allocate(cands, W, 20, admit=div.admit)
    assert sorted(c.ad_id for c in out) == [0, 1, 2, 1000, 1001]


def test_near_duplicates_of_one_advertiser_collapse_but_not_across_advertisers() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=DIM)
    near = base + 0.01 * rng.normal(size=DIM)  # cosine ~0.9999 with base
    other = rng.normal(size=DIM)
    emb = np.stack([base, near, base, other, np.zeros(DIM), np.zeros(DIM)]).astype(np.float32)
    # ads 10, 11: advertiser 1 near-duplicates; 12: same text, advertiser 2; 13: advertiser 1,
    # different text; 14, 15: advertiser 1, no text.
    adv = np.array([1, 1, 2, 1, 1, 1])
    config = DiversityConfig(max_per_advertiser=10)
    groups = duplicate_groups(adv, emb * 3.0, config.duplicate_similarity)
    assert groups.tolist() == [0, 0, 2, 3, -1, -1]  # the embeddings' scale does not matter
    np.testing.assert_array_equal(groups, duplicate_groups(adv, emb, config.duplicate_similarity))
    catalog = AdCatalog(np.arange(10, 16), adv, groups)
    div = Diversifier(catalog, config, 20)
    assert [div.admit(a) for a in range(10, 16)] == [True, False, True, True, True, True]
    assert div.refused == {"capped": 0, "duplicate": 1}
    # Through the merge: the duplicate the merge reaches first stays, whichever list holds it.
    cands = {"sequential": _ranked([11, 12, 13]), "content": _ranked([10, 14])}
    out = allocate(cands, W, 10, admit=Diversifier(catalog, config, 10).admit)
    assert sorted(c.ad_id for c in out) == [11, 12, 13, 14]
    # 1.0 turns the collapse off.
    off = Diversifier(catalog, DiversityConfig(max_per_advertiser=10, duplicate_similarity=1.0), 20)
    assert all(off.admit(a) for a in range(10, 16))


def test_the_diversifier_collapses_a_shared_group_only_within_one_advertiser() -> None:
    # Hand-made groups: 20 and 21 (advertiser 1) share group 5, and so does 22 (advertiser 2);
    # 23 (advertiser 1) has no group, like 24, 25 (-1 shared is not a group).
    catalog = AdCatalog(
        np.array([20, 21, 22, 23, 24, 25]),
        np.array([1, 1, 2, 1, 1, 1]),
        np.array([5, 5, 5, -1, -1, -1]),
    )
    div = Diversifier(catalog, DiversityConfig(max_per_advertiser=10), 20)
    assert [div.admit(a) for a in (22, 20, 21, 23, 24, 25)] == [True, True, False] + [True] * 3
    assert div.refused == {"capped": 0, "duplicate": 1}
    # The cap is checked first: a capped duplicate counts as capped.
    capped = Diversifier(catalog, DiversityConfig(max_per_advertiser=1), 20)
    assert capped.admit(20) and not capped.admit(21)
    assert capped.refused == {"capped": 1, "duplicate": 0}


def test_ads_the_catalog_does_not_know_are_never_refused() -> None:
    catalog = _catalog({5: 1, 6: 1, 7: 1, 9: 1})
    assert catalog.row(8) == catalog.row(-3) == catalog.row(10**12) == -1
    assert catalog.advertiser(8) is None and catalog.advertiser(9) == 1
    div = Diversifier(catalog, DiversityConfig(max_per_advertiser=1), 20)
    assert all(div.admit(a) for a in range(100, 200))
    assert div.admit(5) and not div.admit(6)  # ... while known ones are capped
    none = np.zeros(0, np.int64)
    empty = Diversifier(AdCatalog(none, none, none), DiversityConfig(), 20)
    assert all(empty.admit(a) for a in range(50))


def _windows_ok(out: list[Candidate], catalog: AdCatalog, config: DiversityConfig) -> bool:
    for start in range(0, len(out), config.window):
        counts = _per_advertiser(out[start : start + config.window], catalog)
        counts.pop(None, None)
        if counts and max(counts.values()) > config.max_per_advertiser:
            return False
    return True


def test_spread_keeps_every_ad_and_caps_each_window() -> None:
    catalog = _catalog(FLOOD)
    config = DiversityConfig()
    div = Diversifier(catalog, config, 60)
    chosen = allocate(_flooded(), W, 60, admit=div.admit)
    assert sum(c.ad_id < 100 for c in chosen) == 9  # the flood's limit for 60 slots
    chosen = sorted(chosen, key=lambda c: c.ad_id >= 100)  # all 9 at the top
    assert not _windows_ok(chosen, catalog, config)
    out = spread(chosen, catalog, config)
    assert Counter(out) == Counter(chosen) and len(out) == len(chosen)
    assert _windows_ok(out, catalog, config)
    for j in (1, 2, 3):  # every prefix of 20 * j ads holds at most 3 * j of one advertiser
        assert _per_advertiser(out[: 20 * j], catalog)[7] <= 3 * j
    # Stable: the other ads keep their order, and so do the flood's.
    assert [c for c in out if c.ad_id >= 1000] == [c for c in chosen if c.ad_id >= 1000]
    assert [c for c in out if c.ad_id < 100] == [c for c in chosen if c.ad_id < 100]


def test_spread_defers_to_the_earliest_position_that_fits() -> None:
    catalog = _catalog({1: 1, 2: 1, 3: 1, 4: 2, 5: 3, 6: 2, 7: 3})
    chosen = [Candidate(a, 1.0, "content") for a in (1, 2, 3, 4, 99, 5, 6, 7)]
    out = spread(chosen, catalog, DiversityConfig(max_per_advertiser=1, window=3))
    assert [c.ad_id for c in out] == [1, 4, 99, 2, 5, 6, 3, 7]
    # Only one advertiser: the first window keeps its cap and the answer ends there.
    same = [Candidate(a, 1.0, "content") for a in (1, 2, 3)]
    assert spread(same, catalog, DiversityConfig(max_per_advertiser=1, window=3)) == same[:1]
    # Past the first window an ad that fits nowhere is kept (the cap there is best effort).
    late = [Candidate(a, 1.0, "content") for a in (1, 4, 5, 2, 3)]
    out = spread(late, catalog, DiversityConfig(max_per_advertiser=1, window=3))
    assert [c.ad_id for c in out] == [1, 4, 5, 2, 3]
    assert spread([], catalog, DiversityConfig()) == []


def test_config_errors_name_the_field() -> None:
    assert DiversityConfig().limit(20) == 3 and DiversityConfig().limit(60) == 9
    assert DiversityConfig().limit(21) == 6 and DiversityConfig(2, 10).limit(5) == 2
    with pytest.raises(ConfigError, match=r"^max_per_advertiser: must be an integer >= 1"):
        DiversityConfig(max_per_advertiser=0)
    with pytest.raises(ConfigError, match=r"^window: must be an integer >= 1"):
        DiversityConfig(window=2.5)  # type: ignore[arg-type]
    for bad in (0.0, -0.5, 1.01, float("nan")):
        with pytest.raises(ConfigError, match=r"^duplicate_similarity: must be in \(0, 1\]"):
            DiversityConfig(duplicate_similarity=bad)
    with pytest.raises(ConfigError, match=r"^k: must be > 0"):
        DiversityConfig().limit(0)
    ids = np.array([1, 2])
    with pytest.raises(ConfigError, match=r"^advertiser_ids: need one per ad \(2\), got 1"):
        AdCatalog(ids, np.array([1]), ids)
    with pytest.raises(ConfigError, match=r"^groups: need one per ad \(2\), got 3"):
        AdCatalog(ids, ids, np.array([0, 1, 2]))
    with pytest.raises(ConfigError, match=r"^groups: need a 1-D integer array"):
        AdCatalog(ids, ids, np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(ConfigError, match=r"^groups: need a 1-D integer array"):
        AdCatalog(ids, ids, np.array([0.0, 1.0]))
    with pytest.raises(ConfigError, match=r"^ad_ids: ad id 2 appears more than once"):
        AdCatalog(np.array([2, 1, 2]), np.array([1, 1, 1]), np.array([0, 1, 2]))
    with pytest.raises(ConfigError, match=r"^ad_ids: need a 1-D integer array"):
        AdCatalog(np.array([1.5, 2.0]), ids, ids)


def test_save_load_round_trip(tmp_path: Path) -> None:
    # Given out of id order: the groups follow their ads when the catalog sorts them.
    catalog = AdCatalog(
        np.array([30, 10, 20, 25]), np.array([3, 1, 1, 2]), np.array([2, 1, 1, -1], np.int32)
    )
    assert catalog.groups.tolist() == [1, 1, -1, 2] and catalog.groups.dtype == np.int64
    catalog.save(tmp_path)
    assert (tmp_path / DIVERSITY_FILE).exists()
    back = AdCatalog.load(tmp_path)
    assert back.ad_ids.tolist() == [10, 20, 25, 30] and back.advertiser_ids.tolist() == [1, 1, 2, 3]
    assert back.groups.dtype == np.int64 and back.groups.tolist() == [1, 1, -1, 2]
    assert [back.advertiser(a) for a in (10, 20, 25, 30, 40)] == [1, 1, 2, 3, None]
    div = Diversifier(back, DiversityConfig(), 20)  # the loaded groups still collapse
    assert [div.admit(a) for a in (20, 10, 25, 30)] == [True, False, True, True]


def test_a_malformed_file_is_refused_naming_the_file_and_the_array(tmp_path: Path) -> None:
    path = tmp_path / DIVERSITY_FILE
    with pytest.raises(CandgenError, match=r"diversity\.npz does not exist"):
        AdCatalog.load(tmp_path)
    np.savez(path, ad_ids=np.arange(3), advertiser_ids=np.arange(3))
    with pytest.raises(CandgenError, match=r"diversity\.npz: groups: missing array"):
        AdCatalog.load(tmp_path)
    # An old file, with text embeddings instead of groups.
    np.savez(path, ad_ids=np.arange(3), advertiser_ids=np.arange(3), embeddings=np.zeros((3, 4)))
    with pytest.raises(CandgenError, match=r"diversity\.npz: groups: missing array"):
        AdCatalog.load(tmp_path)
    np.savez(path, ad_ids=np.arange(3), groups=np.arange(3))
    with pytest.raises(CandgenError, match=r"diversity\.npz: advertiser_ids: missing array"):
        AdCatalog.load(tmp_path)
    np.savez(path, ad_ids=np.arange(3), advertiser_ids=np.arange(3), groups=np.zeros(3))
    with pytest.raises(CandgenError, match=r"diversity\.npz: groups: need a 1-D integer array"):
        AdCatalog.load(tmp_path)
    np.savez(path, ad_ids=np.arange(3), advertiser_ids=np.arange(3), groups=np.arange(2))
    with pytest.raises(CandgenError, match=r"diversity\.npz: groups: need one per ad \(3\)"):
        AdCatalog.load(tmp_path)
    path.write_bytes(b"not an archive at all")
    with pytest.raises(CandgenError, match=r"diversity\.npz: not a readable npz file"):
        AdCatalog.load(tmp_path)


def test_without_admit_allocate_is_unchanged_on_a_random_example() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        # Overlapping lists of uneven length, so that dedup and refill both happen.
        cands = {
            g: _ranked(rng.choice(200, size=int(rng.integers(0, 60)), replace=False).tolist())
            for g in W
        }
        k = int(rng.integers(1, 120))
        base = allocate(cands, W, k)
        assert allocate(cands, W, k, admit=None) == base
        assert allocate(cands, W, k, admit=lambda _ad: True) == base
        unknown = _catalog({10_000: 1})  # knows none of these ads: admits every one
        assert allocate(cands, W, k, admit=Diversifier(unknown, DiversityConfig(), k).admit) == base
        order = list(W)
        assert snake_merge(cands, order, k, admit=lambda _ad: True) == snake_merge(cands, order, k)


def test_duplicate_groups_join_near_identical_texts_only_within_one_advertiser() -> None:
    rng = np.random.default_rng(2)
    base = rng.normal(size=DIM)
    near = base + 0.01 * rng.normal(size=DIM)  # cosine ~0.9999 with base
    emb = np.stack([base, near, base, near]).astype(np.float32)
    # Rows 0, 1: advertiser 1; rows 2, 3: the same pair, but under advertisers 2 and 3.
    groups = duplicate_groups(np.array([1, 1, 2, 3]), emb, 0.92)
    assert groups.dtype == np.int64 and groups.tolist() == [0, 0, 2, 3]
    # Interleaved advertisers: each ad joins its own advertiser's leader (the leader's row).
    assert duplicate_groups(np.array([1, 2, 1, 2]), emb, 0.92).tolist() == [0, 1, 0, 1]
    # A threshold above the pair's similarity keeps them apart.
    assert duplicate_groups(np.array([1, 1]), emb[:2], 0.999999).tolist() == [0, 1]


def test_duplicate_groups_join_the_first_earlier_leader_only() -> None:
    # 0 and 40 degrees are apart (cos 0.77); 20 degrees is near both (cos 0.94).
    adv = np.array([5, 5, 5])
    emb = np.stack([_unit(0), _unit(40), _unit(20)])
    assert duplicate_groups(adv, emb, 0.92).tolist() == [0, 1, 0]
    assert duplicate_groups(adv, emb[[1, 0, 2]], 0.92).tolist() == [0, 1, 0]
    # 10 is near 0 (a leader); 25 is near 10 (a member) but not 0 (cos 0.906): its own group.
    emb = np.stack([_unit(0), _unit(10), _unit(25)])
    assert duplicate_groups(adv, emb, 0.92).tolist() == [0, 0, 2]


def test_duplicate_groups_put_ads_without_text_in_no_group() -> None:
    base = _unit(30)
    zero = np.zeros(2, np.float32)
    emb = np.stack([zero, base, zero, base, zero])
    assert duplicate_groups(np.array([1, 1, 1, 1, 2]), emb, 0.92).tolist() == [-1, 1, -1, 1, -1]
    assert duplicate_groups(np.array([1, 1]), np.stack([zero, zero]), 0.5).tolist() == [-1, -1]
    empty = duplicate_groups(np.zeros(0, np.int64), np.zeros((0, DIM)), 0.92)
    assert empty.dtype == np.int64 and empty.shape == (0,)


def test_duplicate_groups_at_similarity_one_give_every_ad_with_text_its_own_group() -> None:
    base = _unit(10)
    emb = np.stack([base, base, base, np.zeros(2, np.float32)])  # identical texts
    adv = np.array([1, 1, 1, 1])
    assert duplicate_groups(adv, emb, 0.92).tolist() == [0, 0, 0, -1]
    for similarity in (1.0, 1.5):
        assert duplicate_groups(adv, emb, similarity).tolist() == [0, 1, 2, -1]


def test_exported_groups_make_the_diversifier_collapse_the_second_ad() -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(size=DIM)
    near = base + 0.01 * rng.normal(size=DIM)
    other = rng.normal(size=DIM)
    # Ads 50 and 20 (advertiser 1) are near-duplicates, 30 is not; ids out of order on purpose.
    ad_ids, adv = np.array([50, 20, 30]), np.array([1, 1, 1])
    config = DiversityConfig(max_per_advertiser=10)
    emb = np.stack([base, near, other]).astype(np.float32)
    catalog = AdCatalog(ad_ids, adv, duplicate_groups(adv, emb, config.duplicate_similarity))
    div = Diversifier(catalog, config, 20)
    assert [div.admit(a) for a in (20, 50, 30)] == [True, False, True]
    assert div.refused == {"capped": 0, "duplicate": 1}
    out = allocate(
        {"sequential": _ranked([50, 20, 30])}, W, 10, admit=Diversifier(catalog, config, 10).admit
    )
    assert [c.ad_id for c in out] == [50, 30]
    # Groups exported at 1.0 never collapse.
    apart = AdCatalog(ad_ids, adv, duplicate_groups(adv, emb, 1.0))
    assert all(Diversifier(apart, config, 20).admit(a) for a in (20, 50, 30))


def test_the_first_window_admitted_holds_at_most_the_cap_so_spread_never_ends_early() -> None:
    # One advertiser floods the top; K = 25 allows it 6 in all, but only 3 in the first 20.
    catalog = AdCatalog(np.arange(1, 41), np.r_[np.full(10, 7), np.arange(100, 130)],
                        np.full(40, -1))  # fmt: skip
    config = DiversityConfig()
    div = Diversifier(catalog, config, 25, list(range(1, 41)))
    admitted = [a for a in range(1, 41) if div.admit(a)]
    assert sum(a <= 10 for a in admitted[:20]) == 3
    assert sum(a <= 10 for a in admitted[:25]) <= 6
    chosen = [Candidate(a, 1.0, "popularity") for a in admitted[:25]]
    assert len(spread(chosen, catalog, config)) == 25


def test_duplicate_groups_read_a_memory_map_in_blocks_and_agree_with_the_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule, ad by ad: each ad joins the first earlier leader of its advertiser near it."""
    import candgen.serving.diversity as diversity

    rng = np.random.default_rng(4)
    n = 700
    advertisers = rng.integers(0, 5, n)
    centres = rng.normal(size=(30, 8))
    emb = (centres[rng.integers(0, 30, n)] + 0.2 * rng.normal(size=(n, 8))).astype(np.float32)
    emb[rng.random(n) < 0.05] = 0.0
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    expected = np.where(np.linalg.norm(emb, axis=1) > 0, np.arange(n), -1)
    leaders: dict[int, list[int]] = {}
    for j in np.flatnonzero(expected >= 0).tolist():
        mine = leaders.setdefault(int(advertisers[j]), [])
        near = [i for i in mine if unit[i] @ unit[j] >= 0.9]
        if near:
            expected[j] = near[0]
        else:
            mine.append(j)
    np.save(tmp_path / "emb.npy", emb)
    monkeypatch.setattr(diversity, "_GROUP_BLOCK", 50)  # blocks smaller than an advertiser
    mapped = np.load(tmp_path / "emb.npy", mmap_mode="r")
    groups = duplicate_groups(advertisers, mapped, 0.9)
    assert (groups != np.arange(n)).sum() > 50  # many near-duplicates: the rule is exercised
    assert groups.tolist() == expected.tolist()
