"""The `retrieve` endpoint's tensor contract, and request validation shared by every entry point.

Every tensor carries Triton's batch dimension first, and one request is one user: a client sends
USER_ID as [1, 1], RECENT_ITEM_IDS as [1, n], and gets AD_IDS back as [1, n]. The shapes below
are each request's own, after that dimension. A request with more than one row is refused naming
the tensor; concurrent requests are batched by the server (the features and encoder steps'
dynamic batchers), not by the client. A request the server has no room for (the first step's
queue full, a wait there past ``ServingConfig.queue_timeout_ms``, or ``max_inflight`` requests
already inside) is refused UNAVAILABLE: retry later or elsewhere.

Inputs (one request = one user):
    USER_ID          INT64  [1]
    SCENARIO         BYTES  [1]    home | search | related
    K                INT32  [1]    1..max_k
    RECENT_ITEM_IDS  INT64  [-1]   optional: real-time actions, oldest first
    QUERY            BYTES  [1]    optional: the search query, UTF-8, at most 512 bytes
    CONTEXT_ITEM_ID  INT64  [1]    optional: the organic item a related-items page shows
Outputs:
    AD_IDS   INT64  [-1]   at most K, never padded
    SCORES   FP32   [-1]
    SOURCES  BYTES  [-1]   the generator of each ad (sequential | content | query | item |
                           popularity)
    FLAGS    BYTES  [-1]   what applied to this request (below), in that order
    SOURCE_NAMES   BYTES  [-1]   every generator, in a fixed order
    SOURCE_COUNTS  INT32  [-1]   how many of the ads each of them contributed
    QUOTA_POLICY   BYTES  [1]    where the quotas came from: fixed | learned | snake | override

The surface's context. Search reads QUERY (the ``query`` generator: the query's MiniLM embedding
against the ads' text); related reads CONTEXT_ITEM_ID (the ``item`` generator: the item's vector
in the model's item table against the ad index); a model trained on context conditions the user
vector on both. Each case, and what the request gets:

    search without QUERY (or a blank one)     answered without it; flag no_query
    related without CONTEXT_ITEM_ID           answered without it; flag no_context_item
    QUERY on home or related                  ignored; flag query_ignored
    CONTEXT_ITEM_ID on home or search         ignored; flag context_item_ignored
    CONTEXT_ITEM_ID the model does not know   ignored; flag unknown_context_item (a new item
                                              is normal traffic: its ads still come)
    QUERY over 512 UTF-8 bytes                error naming QUERY (the limit bounds the
                                              encoder's cost; a client can cut its text)
    QUERY not valid UTF-8                     error naming QUERY (a client bug)
    CONTEXT_ITEM_ID <= 0                      error naming CONTEXT_ITEM_ID (ids start at 1)
    CONTEXT_ITEM_ID that is an ad             error naming CONTEXT_ITEM_ID (the context is the
                                              organic item shown; an ad id there is a client
                                              mixing up the two id sets)
    more than one value in either, or a wrong dtype
                                              error naming the tensor

Errors are INVALID_ARG answers to that request alone; the server goes on serving. FLAGS order:
cold_start, fallback, no_profile, then the context flags above in that order. no_profile: the
store holds no country, age bucket or device for the user (an unknown user, or the store is
unreachable), so only campaigns that target no one in particular reach them.

Every answer holds only ads the request may get (candgen.serving.eligibility): campaigns that
target the user's profile and the surface, running now (not paused, within budget, through the
pacing throttle), under the user's frequency caps, of advertisers the user has not hidden; at
most ServingConfig.max_ads_per_advertiser ads of one advertiser in the first advertiser_window
(20) ads and per window of K, near-duplicates of one advertiser collapsed
(candgen.serving.diversity). It is short of K where the generators' candidates hold fewer such
ads than K (the searches stay inside the eligible ads and answer exactly where HNSW falls short;
popularity reads 3K deep). With the store unreachable (fallback) the user's caps and hides are
unknown and cannot be applied; targeting then fails closed (no_profile).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from candgen.errors import ConfigError

INPUTS = {
    "USER_ID": np.int64,
    "SCENARIO": np.object_,
    "K": np.int32,
    "RECENT_ITEM_IDS": np.int64,
    "QUERY": np.object_,
    "CONTEXT_ITEM_ID": np.int64,
}
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
MAX_QUERY_BYTES = 512
# The context flags, in FLAGS order (after cold_start, fallback and no_profile).
NO_QUERY, NO_CONTEXT_ITEM = "no_query", "no_context_item"
QUERY_IGNORED, CONTEXT_ITEM_IGNORED = "query_ignored", "context_item_ignored"
UNKNOWN_CONTEXT_ITEM = "unknown_context_item"
# The surface that reads each kind of context.
QUERY_SURFACE, CONTEXT_ITEM_SURFACE = "search", "related"


@dataclass(frozen=True)
class Request:
    user_id: int
    scenario: str
    k: int
    recent_item_ids: tuple[int, ...] = ()
    query: str | None = None
    context_item_id: int | None = None


@dataclass(frozen=True)
class SurfaceContext:
    """The request's context as its surface reads it.

    Attributes:
        query: the search query (search only; None: none, or ignored).
        context_item: the related page's item (related only; None: none, or ignored).
        flags: what was missing or ignored (``NO_QUERY``, ``QUERY_IGNORED``...).
    """

    query: str | None = None
    context_item: int | None = None
    flags: tuple[str, ...] = ()


def parse_query(value: object) -> str | None:
    """The query text of a QUERY value (bytes or str): None when blank.

    Raises:
        ConfigError: not valid UTF-8, or longer than ``MAX_QUERY_BYTES`` bytes.
    """
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")
    if len(raw) > MAX_QUERY_BYTES:
        raise ConfigError("QUERY", f"at most {MAX_QUERY_BYTES} UTF-8 bytes, got {len(raw)}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("QUERY", f"not valid UTF-8 (byte {e.start}: {e.reason})") from None
    return text.strip() or None


def parse_context_item(value: int) -> int:
    if value <= 0:
        raise ConfigError("CONTEXT_ITEM_ID", f"item ids are >= 1, got {value}")
    return value


def surface_context(scenario: str, query: str | None, context_item: int | None) -> SurfaceContext:
    """Keeps the context that ``scenario`` reads, and flags what is missing or ignored."""
    flags = []
    if scenario == QUERY_SURFACE and query is None:
        flags.append(NO_QUERY)
    if scenario == CONTEXT_ITEM_SURFACE and context_item is None:
        flags.append(NO_CONTEXT_ITEM)
    if scenario != QUERY_SURFACE and query is not None:
        flags.append(QUERY_IGNORED)
        query = None
    if scenario != CONTEXT_ITEM_SURFACE and context_item is not None:
        flags.append(CONTEXT_ITEM_IGNORED)
        context_item = None
    return SurfaceContext(query, context_item, tuple(flags))


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
    query = arrays.get("QUERY")
    item = arrays.get("CONTEXT_ITEM_ID")
    return Request(
        user_id=int(_scalar("USER_ID", arrays["USER_ID"])),  # type: ignore[call-overload]
        scenario=str(scenario),
        k=k,
        recent_item_ids=tuple(int(x) for x in recent.reshape(-1)) if recent is not None else (),
        query=parse_query(_scalar("QUERY", query)) if query is not None else None,
        context_item_id=(
            parse_context_item(int(_scalar("CONTEXT_ITEM_ID", item)))  # type: ignore[call-overload]
            if item is not None
            else None
        ),
    )
