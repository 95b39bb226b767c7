"""Choosing each user's search query and related context item from the log, and the overlap
between two surfaces' answers (candgen.endpoint.surface_context)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from candgen.endpoint.surface_context import (
    SurfaceContext,
    choose_contexts,
    mean_overlap,
    most_clicking_users,
    overlap_at_k,
)
from candgen.errors import ConfigError

ITEMS = pd.DataFrame(
    {
        "item_id": [1, 2, 3, 4, 5],
        "category": ["gaming", "gaming", "gaming", "kitchen", "kitchen"],
        "title": [
            "gaming headset #1",
            "gaming mouse #2",
            "gaming mouse #3",
            "chef knife #4",
            "stand mixer #5",
        ],
    }
)


def _event(
    user: int,
    t: int,
    surface: str = "home",
    kind: str = "engage",
    item: int | None = None,
    query: str | None = None,
    context: int | None = None,
) -> dict[str, object]:
    return {
        "user_id": user,
        "event_ts": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(seconds=t),
        "surface": surface,
        "event_type": kind,
        "item_id": float("nan") if item is None else float(item),
        "query": query,
        "context_item_id": float("nan") if context is None else float(context),
    }


def _log(*rows: dict[str, object]) -> pd.DataFrame:
    # Shuffled on purpose: the choice goes by event time, not by row order.
    return pd.DataFrame(list(rows)).iloc[::-1].reset_index(drop=True)


def test_the_latest_logged_query_and_context_item_win() -> None:
    events = _log(
        _event(1, 10, "search", item=1, query="gaming mouse"),
        _event(1, 30, "search", kind="impression", query="chef knfe"),
        _event(1, 20, "search", item=4, query="stand mixer"),
        _event(1, 5, "related", item=2, context=3),
        _event(1, 40, "related", kind="impression", context=5),
        _event(1, 50, "home", item=2),
    )
    assert choose_contexts(events, ITEMS, [1]) == {
        1: SurfaceContext("chef knfe", "logged", 5, "logged")
    }


def test_without_searches_the_query_names_the_most_engaged_category_s_noun() -> None:
    # Three gaming engagements (two of them mice) against two kitchen ones; the latest
    # engagement (item 4) is the context item, since the user never opened a related page.
    events = _log(
        _event(2, 1, item=1),
        _event(2, 2, item=2),
        _event(2, 3, item=3),
        _event(2, 4, item=5),
        _event(2, 5, item=4),
        _event(2, 6, "search", kind="impression", query=""),
    )
    assert choose_contexts(events, ITEMS, [2]) == {
        2: SurfaceContext("gaming mouse", "category", 4, "engaged")
    }


def test_a_tie_between_categories_goes_to_the_one_engaged_with_last() -> None:
    events = _log(_event(3, 1, item=1), _event(3, 2, item=4))
    assert choose_contexts(events, ITEMS, [3])[3].query == "chef knife"
    events = _log(_event(3, 1, item=4), _event(3, 2, item=1))
    assert choose_contexts(events, ITEMS, [3])[3].query == "gaming headset"


def test_ad_events_alone_give_no_context_and_an_unknown_user_none() -> None:
    events = _log(
        _event(4, 1, kind="impression"),
        _event(4, 2, kind="click"),
        _event(5, 1, item=1),
    )
    got = choose_contexts(events, ITEMS, [4, 6])
    assert got[4] == SurfaceContext(None, "none", None, "none")
    assert got[6] == SurfaceContext(None, "none", None, "none")


def test_another_user_s_log_is_never_used() -> None:
    events = _log(
        _event(7, 1, "search", item=1, query="gaming headset"),
        _event(7, 2, "related", item=1, context=2),
        _event(8, 3, item=5),
    )
    assert choose_contexts(events, ITEMS, [8]) == {
        8: SurfaceContext("stand mixer", "category", 5, "engaged")
    }


def test_most_clicking_users_ranks_by_clicks_then_id() -> None:
    events = _log(
        _event(3, 1, kind="click"),
        _event(3, 2, kind="click"),
        _event(9, 1, kind="click"),
        _event(2, 1, kind="click"),
        _event(1, 1, kind="impression"),
        _event(1, 2, kind="impression"),
        _event(1, 3, kind="impression"),
    )
    assert most_clicking_users(events, 2) == [3, 2]
    assert most_clicking_users(events, 10) == [3, 2, 9]


def test_overlap_counts_shared_ads_of_the_top_k_against_k() -> None:
    home = [1, 2, 3, 4]
    assert overlap_at_k(home, [4, 3, 2, 1], 4) == 1.0
    assert overlap_at_k(home, [9, 8, 1, 2], 4) == 0.5
    # Only the top k count, and a short list counts against k.
    assert overlap_at_k(home, [9, 8, 7, 1], 3) == 0.0
    assert overlap_at_k(home, [1], 4) == 0.25
    with pytest.raises(ConfigError, match=r"^k: must be at least 1"):
        overlap_at_k(home, home, 0)


def test_mean_overlap_averages_per_user() -> None:
    pairs = [([1, 2], [1, 2]), ([1, 2], [3, 4]), ([1, 2], [2, 5])]
    assert mean_overlap(pairs, 2) == pytest.approx(0.5)
    assert math.isnan(mean_overlap([], 2))
