"""Quota allocation across candidate generators (pure logic)."""

from __future__ import annotations

import pytest

from candgen.errors import ConfigError
from candgen.serving.quota import QuotaConfig, allocate, initial_quotas

W = {"sequential": 0.6, "content": 0.25, "popularity": 0.15}


def _ranked(start: int, n: int) -> list[tuple[int, float]]:
    return [(start + i, 1.0 - i / 1000) for i in range(n)]


def test_initial_quotas_sum_to_k_by_largest_remainder() -> None:
    assert initial_quotas(W, 10) == {"sequential": 6, "content": 3, "popularity": 1}
    assert sum(initial_quotas(W, 7).values()) == 7
    assert initial_quotas(W, 100) == {"sequential": 60, "content": 25, "popularity": 15}


def test_full_generators_get_their_weighted_share() -> None:
    cands = {"sequential": _ranked(0, 100), "content": _ranked(1000, 100),
             "popularity": _ranked(2000, 100)}  # fmt: skip
    out = allocate(cands, W, 20)
    sources = [c.source for c in out]
    assert (sources.count("sequential"), sources.count("content"),
            sources.count("popularity")) == (12, 5, 3)  # fmt: skip
    assert [c.ad_id for c in out[:12]] == list(range(12))  # best first within a generator


def test_unfilled_slots_move_to_the_other_generators() -> None:
    cands = {"sequential": _ranked(0, 100), "content": _ranked(1000, 2),
             "popularity": _ranked(2000, 100)}  # fmt: skip
    out = allocate(cands, W, 20)
    sources = [c.source for c in out]
    assert len(out) == 20 and sources.count("content") == 2
    assert sources.count("sequential") > 12 and sources.count("popularity") > 3


def test_duplicates_are_kept_once_and_the_slot_refilled() -> None:
    cands = {"sequential": _ranked(0, 50), "content": _ranked(0, 50),
             "popularity": _ranked(0, 50)}  # fmt: skip
    out = allocate(cands, W, 10)
    ids = [c.ad_id for c in out]
    assert len(ids) == len(set(ids)) == 10
    assert out[0].source == "sequential" and out[0].ad_id == 0


def test_fewer_eligible_ads_than_k_gives_fewer_results_without_padding() -> None:
    cands = {"sequential": _ranked(0, 3), "content": [], "popularity": _ranked(0, 2)}
    out = allocate(cands, W, 100)
    assert sorted(c.ad_id for c in out) == [0, 1, 2]
    assert all(c.ad_id >= 0 for c in out)


def test_bad_input_names_the_field() -> None:
    with pytest.raises(ConfigError, match="k: must be > 0"):
        allocate({}, W, 0)
    with pytest.raises(ConfigError, match=r"weights\.home: weights must be >= 0 and sum to 1"):
        QuotaConfig({"home": {"sequential": 0.5, "content": 0.1}})
    with pytest.raises(ConfigError, match=r"weights.home: unknown generator\(s\) \['bandit'\]"):
        QuotaConfig({"home": {"bandit": 1.0}})
    with pytest.raises(ConfigError, match="scenario: unknown surface 'inbox'"):
        QuotaConfig().for_surface("inbox")


def test_each_surface_gives_its_own_context_generator_a_real_share() -> None:
    from candgen.serving.quota import DEFAULT_WEIGHTS, GENERATORS

    assert {g for w in DEFAULT_WEIGHTS.values() for g in w} == set(GENERATORS)
    assert DEFAULT_WEIGHTS["home"]["query"] == DEFAULT_WEIGHTS["home"]["item"] == 0.0
    assert DEFAULT_WEIGHTS["search"]["query"] >= 0.3 and DEFAULT_WEIGHTS["search"]["item"] == 0.0
    assert DEFAULT_WEIGHTS["related"]["item"] >= 0.3 and DEFAULT_WEIGHTS["related"]["query"] == 0.0
    full = {g: _ranked(1000 * i, 100) for i, g in enumerate(GENERATORS)}
    search = [c.source for c in allocate(full, QuotaConfig().for_surface("search"), 20)]
    assert search.count("query") == 8 and "item" not in search
    # A search without a query: the query generator found nothing, and its slots go to the others.
    no_query = {g: c for g, c in full.items() if g != "query"}
    out = allocate(no_query, QuotaConfig().for_surface("search"), 20)
    assert len(out) == 20 and {c.source for c in out} == {"sequential", "content", "popularity"}


def test_a_learned_table_from_before_the_context_generators_gives_them_nothing() -> None:
    from candgen.serving.quota import ACTIVITY_BUCKETS, GENERATORS, LearnedQuotas, QuotaPolicy
    from candgen.vocab import SURFACES

    old = ("sequential", "content", "popularity")
    body = {
        "generators": list(old),
        "rank_edges": [10, 20],
        "activity_edges": [1, 10, 50],
        "alpha": {f"{s}/{b}": [[5.0, 2.0]] * 3 for s in SURFACES for b in ACTIVITY_BUCKETS},
        "beta": {f"{s}/{b}": [[5.0, 8.0]] * 3 for s in SURFACES for b in ACTIVITY_BUCKETS},
    }
    table = LearnedQuotas.from_dict(body)  # as candgen quotas learn wrote it then
    full = {g: _ranked(1000 * i, 100) for i, g in enumerate(GENERATORS)}
    out = QuotaPolicy("learned", learned=table).select(full, "search", 0, 30)
    assert len(out) == 30 and not {c.source for c in out} & {"query", "item"}
