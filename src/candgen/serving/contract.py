"""The `retrieve` endpoint's tensor contract, and request validation shared by every entry point.

Inputs (one request = one user):
    USER_ID          INT64  [1]
    SCENARIO         BYTES  [1]    home | search | related
    K                INT32  [1]    1..max_k
    RECENT_ITEM_IDS  INT64  [-1]   optional: real-time actions, oldest first
Outputs:
    AD_IDS   INT64  [-1]   at most K, never padded
    SCORES   FP32   [-1]
    SOURCES  BYTES  [-1]   the generator of each ad (sequential | content | popularity)
    FLAGS    BYTES  [-1]   cold_start and/or fallback when they apply
    SOURCE_NAMES   BYTES  [-1]   every generator, in a fixed order
    SOURCE_COUNTS  INT32  [-1]   how many of the ads each of them contributed
    QUOTA_POLICY   BYTES  [1]    where the quotas came from: fixed | learned | snake | override
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from candgen.errors import ConfigError

INPUTS = {"USER_ID": np.int64, "SCENARIO": np.object_, "K": np.int32, "RECENT_ITEM_IDS": np.int64}
OUTPUTS = {
    "AD_IDS": np.int64,
    "SCORES": np.float32,
    "SOURCES": np.object_,
    "FLAGS": np.object_,
    "SOURCE_NAMES": np.object_,
    "SOURCE_COUNTS": np.int32,
    "QUOTA_POLICY": np.object_,
}
REQUIRED = ("USER_ID", "SCENARIO", "K")


@dataclass(frozen=True)
class Request:
    user_id: int
    scenario: str
    k: int
    recent_item_ids: tuple[int, ...] = ()


def check_k(k: int, max_k: int) -> None:
    if not 0 < k <= max_k:
        raise ConfigError("K", f"must be in 1..{max_k}, got {k}")


def _scalar(name: str, value: np.ndarray) -> object:
    if value.size != 1:
        raise ConfigError(name, f"expected one value (shape [1]), got shape {list(value.shape)}")
    return value.reshape(-1)[0]


def parse_request(tensors: Mapping[str, np.ndarray | None], max_k: int) -> Request:
    """Checks names, dtypes, shapes and ranges; every error names the tensor at fault."""
    unknown = sorted(set(tensors) - set(INPUTS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown input; expected some of {sorted(INPUTS)}")
    for name in REQUIRED:
        if tensors.get(name) is None:
            raise ConfigError(name, "missing required input")
    arrays = {n: np.asarray(v) for n, v in tensors.items() if v is not None}
    for name, value in arrays.items():
        want = INPUTS[name]
        ok = (
            value.dtype == np.object_ or value.dtype.kind in "SU"
            if want is np.object_
            else np.issubdtype(value.dtype, np.integer)
        )
        if not ok:
            kind = "BYTES" if want is np.object_ else np.dtype(want).name.upper()
            raise ConfigError(name, f"expected {kind}, got {value.dtype}")
    k = int(_scalar("K", arrays["K"]))  # type: ignore[call-overload]
    check_k(k, max_k)
    scenario = _scalar("SCENARIO", arrays["SCENARIO"])
    if isinstance(scenario, bytes):
        scenario = scenario.decode("utf-8", errors="replace")
    recent = arrays.get("RECENT_ITEM_IDS")
    if recent is not None and recent.ndim > 1:
        raise ConfigError("RECENT_ITEM_IDS", f"expected shape [-1], got {list(recent.shape)}")
    return Request(
        user_id=int(_scalar("USER_ID", arrays["USER_ID"])),  # type: ignore[call-overload]
        scenario=str(scenario),
        k=k,
        recent_item_ids=tuple(int(x) for x in recent.reshape(-1)) if recent is not None else (),
    )
