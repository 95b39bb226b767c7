"""Each user's own surface context, read from the marketplace's event log, and how far the
surfaces' answers differ.

The demo and the surface-overlap measurement ask the live ensemble for a user's ads on search
and related with the context that user would plausibly bring: their latest logged search query
and related-page item. A user who never searched gets a query naming the noun they engaged with
most in their most engaged category; one who never opened a related page gets their latest
engaged organic item. A user with no log at all gets neither (the ensemble flags it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd

from candgen.data.synth_text import CATEGORY_NOUNS
from candgen.errors import ConfigError

EVENT_COLUMNS = (
    "user_id",
    "event_ts",
    "surface",
    "event_type",
    "item_id",
    "query",
    "context_item_id",
)
ITEM_COLUMNS = ("item_id", "category", "title")

_NOUNS = dict(CATEGORY_NOUNS)


@dataclass(frozen=True)
class SurfaceContext:
    """What a user brings to search and related.

    Attributes:
        query: the search query, or None when nothing is known about the user.
        query_source: ``logged`` (their latest search), ``category`` (built from their most
            engaged category's noun) or ``none``.
        context_item_id: the related page's item, or None.
        context_source: ``logged`` (their latest related page), ``engaged`` (their latest
            engaged organic item) or ``none``.
    """

    query: str | None
    query_source: str
    context_item_id: int | None
    context_source: str


def choose_contexts(
    events: pd.DataFrame, items: pd.DataFrame, user_ids: Iterable[int]
) -> dict[int, SurfaceContext]:
    """Each user's search query and related context item (see the module docstring).

    Args:
        events: the event log with at least ``EVENT_COLUMNS``.
        items: the organic catalogue with ``ITEM_COLUMNS``.
        user_ids: the users to choose for; one absent from the log gets no context.
    """
    users = [int(u) for u in user_ids]
    ev = events[events["user_id"].isin(users)].sort_values("event_ts", kind="stable")
    searched = ev[(ev["surface"] == "search") & ev["query"].notna() & (ev["query"] != "")]
    last_query = searched.groupby("user_id")["query"].last()
    related = ev[(ev["surface"] == "related") & ev["context_item_id"].notna()]
    last_context = related.groupby("user_id")["context_item_id"].last()
    engaged = ev[(ev["event_type"] == "engage") & ev["item_id"].notna()]
    last_engaged = engaged.groupby("user_id")["item_id"].last()
    catalogue = items.set_index("item_id")[["category", "title"]]
    engaged = engaged.join(catalogue, on="item_id")

    out: dict[int, SurfaceContext] = {}
    for uid in users:
        if uid in last_query.index:
            query: str | None = str(last_query[uid])
            query_source = "logged"
        else:
            query = category_query(engaged[engaged["user_id"] == uid])
            query_source = "none" if query is None else "category"
        if uid in last_context.index:
            context: int | None = int(last_context[uid])
            context_source = "logged"
        elif uid in last_engaged.index:
            context, context_source = int(last_engaged[uid]), "engaged"
        else:
            context, context_source = None, "none"
        out[uid] = SurfaceContext(query, query_source, context, context_source)
    return out


def category_query(engaged: pd.DataFrame) -> str | None:
    """A query for a user who never searched: the noun they engaged with most within the
    category they engaged with most (ties: the one engaged with last), lower-cased as the
    marketplace's queries are. ``engaged`` holds their engagements, oldest first, with each
    item's ``category`` and ``title``; None when it is empty."""
    engaged = engaged.dropna(subset=["category"])
    if engaged.empty:
        return None
    category = _most_frequent(engaged["category"].tolist())
    nouns = _NOUNS.get(category, ())
    titles = engaged.loc[engaged["category"] == category, "title"].astype(str).tolist()
    named = [n for t in titles for n in nouns if t.lower().startswith(n.lower())]
    if named:
        return _most_frequent(named).lower()
    return (nouns[0] if nouns else category).lower()


def _most_frequent(values: Sequence[str]) -> str:
    """The most frequent value; among equals, the one seen last."""
    counts: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, v in enumerate(values):
        counts[v] = counts.get(v, 0) + 1
        last[v] = i
    return max(counts, key=lambda v: (counts[v], last[v]))


def most_clicking_users(events: pd.DataFrame, n: int) -> list[int]:
    """The ``n`` users with the most ad clicks (ties: the lower id first)."""
    clicks = events.loc[events["event_type"] == "click", "user_id"].value_counts()
    ranked = sorted(clicks.items(), key=lambda kv: (-int(kv[1]), int(kv[0])))
    return [int(u) for u, _ in ranked[:n]]


def overlap_at_k(a: Sequence[int], b: Sequence[int], k: int) -> float:
    """|top-k of a ∩ top-k of b| / k: 1.0 when two surfaces show the same k ads, in any order.

    A list shorter than k still counts against k: missing ads are not shared ones.
    """
    if k < 1:
        raise ConfigError("k", f"must be at least 1, got {k}")
    return len(set(a[:k]) & set(b[:k])) / k


def mean_overlap(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], k: int) -> float:
    """The mean of ``overlap_at_k`` over users' (a, b) pairs; NaN for no pairs."""
    if not pairs:
        return float("nan")
    return sum(overlap_at_k(a, b, k) for a, b in pairs) / len(pairs)
