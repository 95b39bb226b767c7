"""Request validation for the retrieve endpoint: every bad input names its tensor."""

from __future__ import annotations

import numpy as np
import pytest

from candgen.errors import ConfigError
from candgen.serving.contract import parse_request


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
    ],
)
def test_bad_requests_name_the_tensor(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_request(_ok() | change, max_k=500)
