"""Request validation for the retrieve endpoint: every bad input names its tensor."""

from __future__ import annotations

import numpy as np
import pytest

from candgen.errors import ConfigError
from candgen.serving.contract import (
    MAX_QUERY_BYTES,
    SurfaceContext,
    parse_query,
    parse_request,
    surface_context,
)


def _ok() -> dict[str, np.ndarray]:
    return {"USER_ID": np.array([7], np.int64), "SCENARIO": np.array([b"home"], np.object_),
            "K": np.array([50], np.int32)}  # fmt: skip


def test_a_good_request_parses() -> None:
    req = parse_request(_ok() | {"RECENT_ITEM_IDS": np.array([3, 4], np.int64)}, max_k=500)
    assert (req.user_id, req.scenario, req.k, req.recent_item_ids) == (7, "home", 50, (3, 4))
    assert parse_request(_ok(), 500).recent_item_ids == ()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"K": np.array([0], np.int32)}, r"K: must be in 1\.\.500, got 0"),
        ({"K": np.array([501], np.int32)}, r"K: must be in 1\.\.500, got 501"),
        ({"K": np.array([1.5], np.float32)}, "K: expected INT32, got float32"),
        ({"USER_ID": np.array([1, 2], np.int64)}, r"USER_ID: expected one value \(shape \[1\]\)"),
        ({"USER_ID": None}, "USER_ID: missing required input"),
        ({"SCENARIO": np.array([1], np.int64)}, "SCENARIO: expected BYTES, got int64"),
        ({"RECENT_ITEM_IDS": np.ones((2, 2), np.int64)}, r"RECENT_ITEM_IDS: expected shape"),
        ({"RECENT_ITEM_IDS": np.array([0.5])}, "RECENT_ITEM_IDS: expected INT64, got float64"),
        ({"USER": np.array([1])}, "USER: unknown input"),
        ({"QUERY": np.array([b"a", b"b"], np.object_)}, r"QUERY: expected one value"),
        ({"QUERY": np.array([3], np.int64)}, "QUERY: expected BYTES, got int64"),
        ({"QUERY": np.array([b"\xff\xfeshoes"], np.object_)}, "QUERY: not valid UTF-8"),
        ({"QUERY": np.array([b"x" * 513], np.object_)}, "QUERY: at most 512 UTF-8 bytes, got 513"),
        ({"CONTEXT_ITEM_ID": np.array([0], np.int64)}, "CONTEXT_ITEM_ID: item ids are >= 1"),
        ({"CONTEXT_ITEM_ID": np.array([-4], np.int64)}, "CONTEXT_ITEM_ID: item ids are >= 1"),
        ({"CONTEXT_ITEM_ID": np.array([1, 2], np.int64)}, "CONTEXT_ITEM_ID: expected one value"),
        ({"CONTEXT_ITEM_ID": np.array([2.0])}, "CONTEXT_ITEM_ID: expected INT64, got float64"),
    ],
)
def test_bad_requests_name_the_tensor(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_request(_ok() | change, max_k=500)


def test_the_context_parses_and_is_optional() -> None:
    req = parse_request(_ok() | {"QUERY": np.array([b"  trail shoes "], np.object_),
                                 "CONTEXT_ITEM_ID": np.array([42], np.int64)}, 500)  # fmt: skip
    assert (req.query, req.context_item_id) == ("trail shoes", 42)
    bare = parse_request(_ok(), 500)
    assert (bare.query, bare.context_item_id) == (None, None)


def test_the_query_limit_counts_utf8_bytes_and_a_blank_query_is_none() -> None:
    assert parse_query("é" * (MAX_QUERY_BYTES // 2)) == "é" * (MAX_QUERY_BYTES // 2)
    with pytest.raises(ConfigError, match=r"^QUERY: at most 512 UTF-8 bytes, got 514"):
        parse_query("é" * (MAX_QUERY_BYTES // 2 + 1))  # 257 characters, 514 bytes
    assert parse_query(b"") is None and parse_query("   ") is None
    with pytest.raises(ConfigError, match=r"^QUERY: not valid UTF-8 \(byte 5"):
        parse_query(b"shoes\xc3")  # a cut multi-byte character
    with pytest.raises(ConfigError, match=r"^QUERY: not valid UTF-8"):
        parse_query("\ud800")  # a lone surrogate (numpy str input) is no UTF-8 text either


@pytest.mark.parametrize(("scenario", "query", "item", "want"), [
    ("search", "shoes", None, SurfaceContext("shoes", None, ())),
    ("search", None, None, SurfaceContext(None, None, ("no_query",))),
    ("search", "shoes", 7, SurfaceContext("shoes", None, ("context_item_ignored",))),
    ("related", None, 7, SurfaceContext(None, 7, ())),
    ("related", None, None, SurfaceContext(None, None, ("no_context_item",))),
    ("related", "shoes", 7, SurfaceContext(None, 7, ("query_ignored",))),
    ("related", "shoes", None, SurfaceContext(None, None, ("no_context_item", "query_ignored"))),
    ("home", None, None, SurfaceContext()),
    ("home", "shoes", 7,
     SurfaceContext(None, None, ("query_ignored", "context_item_ignored"))),
])  # fmt: skip
def test_each_surface_keeps_its_own_context_and_flags_the_rest(
    scenario: str, query: str | None, item: int | None, want: SurfaceContext
) -> None:
    assert surface_context(scenario, query, item) == want
