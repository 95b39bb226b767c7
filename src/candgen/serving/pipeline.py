"""One retrieval request end to end, in library form (the Triton models are thin over it).

features (Feast feature server) and the surface's context (query, context item) -> query
embedding and user encoder -> candidates per generator (sequential ANN, content, query, item,
popularity/pacing) -> quota allocation per surface -> dedup and eligibility.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from candgen.errors import CandgenError, ConfigError
from candgen.features.client import FeatureStoreUnavailable
from candgen.index.ann import AdIndex, not_in
from candgen.serving.contract import (
    UNKNOWN_CONTEXT_ITEM,
    check_k,
    parse_context_item,
    parse_query,
    surface_context,
)
from candgen.serving.diversity import AdCatalog, Diversifier, DiversityConfig, spread
from candgen.serving.eligibility import (
    AD_INDEX,
    CONTENT_INDEX,
    NO_PROFILE,
    PROFILE_FIELDS,
    Eligibility,
    FrequencyCaps,
    RequestEligibility,
    caps_from_features,
)
from candgen.serving.generators import ContentGenerator, PacingPopularity
from candgen.serving.quota import Candidate, QuotaPolicy, source_counts
from candgen.serving.shards import ShardedIndex
from candgen.vocab import USER_SERVING_SERVICE

if TYPE_CHECKING:  # torch and onnxruntime are imported only by the step that encodes
    from candgen.models.retriever import Retriever
    from candgen.serving.generative import GenerativeAds
    from candgen.serving.query_encoder import QueryEncoder

USER_SERVICE = USER_SERVING_SERVICE
COLD_START, FALLBACK = "cold_start", "fallback"
POPULARITY_DEPTH = 3  # popularity candidates per answer slot (see generate)


class FeatureSource(Protocol):
    def lookup(self, service: str, entity: str, key: int) -> dict[str, Any] | None: ...


@runtime_checkable
class BatchFeatureSource(FeatureSource, Protocol):
    """A feature source that reads many entities in one call (the feature server client)."""

    def lookup_many(
        self, service: str, entity: str, keys: list[int]
    ) -> list[dict[str, Any] | None]: ...


@dataclass(frozen=True)
class RetrievalResult:
    """What a request gets back.

    Attributes:
        ad_ids, scores, sources: the chosen ads, their generator's score and the generator.
        cold_start: nothing was known about the user (no features, no recent items).
        fallback: the feature store could not be reached; candidates come from what the
            request itself carried and from the fallback generators.
        source_counts: how many of the ads each generator contributed.
        quota_policy: where this request's quotas came from: fixed, learned, snake or override.
        flags: every flag of the request, in FLAGS order: cold_start, fallback, then the
            context's (no_query, query_ignored, unknown_context_item...; see contract.py).
    """

    ad_ids: list[int]
    scores: list[float]
    sources: list[str]
    cold_start: bool = False
    fallback: bool = False
    source_counts: dict[str, int] = field(default_factory=dict)
    quota_policy: str = ""
    flags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class UserContext:
    """What the features step knows about the requesting user.

    Attributes:
        history: engaged item/ad ids, oldest first: the stored short-term sequence, then the
            request's real-time items.
        times: seconds since the epoch of each history item, or None when there are none.
        affinity: the long-term category affinity, or None.
        long_term: the long-term summary embedding (``user_long_term_embedding``), or None.
        activity: the user's lifetime actions (engagements and ad clicks) plus the request's
            real-time ones: what sets the user's activity bucket for the quotas.
        cold_start: nothing was known about the user (no features, no recent items).
        fallback: the feature store could not be reached.
        profile: the user's country, age_bucket and device as targeting reads them (None:
            unknown; a user with none gets only campaigns that target no one in particular).
        blocked_ads: ads at the user's frequency cap today.
        blocked_advertisers: advertisers the user hid or saw too often today.
    """

    history: list[int]
    times: list[float] | None = None
    affinity: list[float] | None = None
    long_term: list[float] | None = None
    activity: int = 0
    cold_start: bool = False
    fallback: bool = False
    profile: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(PROFILE_FIELDS))
    blocked_ads: list[int] = field(default_factory=list)
    blocked_advertisers: list[int] = field(default_factory=list)

    @property
    def no_profile(self) -> bool:
        return all(self.profile.get(f) is None for f in PROFILE_FIELDS)

    @property
    def flags(self) -> list[str]:
        return [
            name
            for name, on in (
                (COLD_START, self.cold_start),
                (FALLBACK, self.fallback),
                (NO_PROFILE, self.no_profile),
            )
            if on
        ]


def user_context(
    features: FeatureSource,
    user_id: int,
    recent_item_ids: Sequence[int] = (),
    caps: FrequencyCaps | None = None,
    today: str | None = None,
) -> UserContext:
    """Step 1: the user's online features joined with the request's real-time items, and what
    eligibility reads of them: the profile, the ads and advertisers the frequency ``caps`` (of
    ``today``, a UTC date; default now) and the user's hides rule out."""
    context = user_contexts(features, [(user_id, recent_item_ids)], caps, today)[0]
    if isinstance(context, Exception):
        raise context
    return context


def user_contexts(
    features: FeatureSource,
    requests: Sequence[tuple[int, Sequence[int]]],
    caps: FrequencyCaps | None = None,
    today: str | None = None,
) -> list[UserContext | Exception]:
    """Step 1 for a batch of requests, each (user id, real-time item ids): ``user_context`` of
    each, with every user's features read in one call where the source reads batches; a user
    whose stored row cannot be read gets the error in its place (the others are answered)."""
    caps = caps or FrequencyCaps()
    day = today or datetime.now(UTC).strftime("%Y-%m-%d")
    rows = _read_users(features, [int(user_id) for user_id, _ in requests])
    out: list[UserContext | Exception] = []
    for (feats, fallback), (_, recent) in zip(rows, requests, strict=True):
        try:
            out.append(_context(feats, fallback, recent, caps, day))
        except Exception as e:  # this user's row, not the batch's
            out.append(e)
    return out


def _read_users(
    features: FeatureSource, user_ids: list[int]
) -> list[tuple[dict[str, Any] | None, bool]]:
    """Each user's features and whether the store was unreachable (the request falls back)."""
    if isinstance(features, BatchFeatureSource):
        try:
            return [(row, False) for row in features.lookup_many(USER_SERVICE, "user_id", user_ids)]
        except FeatureStoreUnavailable:
            return [(None, True)] * len(user_ids)
    rows: list[tuple[dict[str, Any] | None, bool]] = []
    for user_id in user_ids:
        try:
            rows.append((features.lookup(USER_SERVICE, "user_id", user_id), False))
        except FeatureStoreUnavailable:
            rows.append((None, True))
    return rows


def _context(
    feats: dict[str, Any] | None,
    fallback: bool,
    recent_item_ids: Sequence[int],
    caps: FrequencyCaps,
    day: str,
) -> UserContext:
    stored = list((feats or {}).get("recent_item_ids") or [])
    stored_times = list((feats or {}).get("recent_timestamps") or [])
    history = [*map(int, stored), *map(int, recent_item_ids)]
    # Real-time items carry no timestamp here: they happened just now.
    now = max(stored_times, default=0.0)
    times = [*map(float, stored_times), *[float(now)] * len(recent_item_ids)]
    affinity = (feats or {}).get("category_affinity")
    long_term = (feats or {}).get("long_term_embedding")
    lifetime = sum(int((feats or {}).get(k) or 0) for k in ("engagements_total", "ad_clicks_total"))
    blocked_ads, blocked_advertisers = caps_from_features(
        feats, day, caps.per_ad, caps.per_advertiser
    )
    profile = {f: (feats or {}).get(f) for f in PROFILE_FIELDS}
    return UserContext(
        history=history,
        times=times if times and len(times) == len(history) else None,
        affinity=[float(a) for a in affinity] if affinity is not None else None,
        long_term=[float(v) for v in long_term] if long_term else None,
        activity=lifetime + len(recent_item_ids),
        cold_start=feats is None and not recent_item_ids and not fallback,
        fallback=fallback,
        profile={f: v if isinstance(v, str) and v else None for f, v in profile.items()},
        blocked_ads=blocked_ads,
        blocked_advertisers=blocked_advertisers,
    )


def context_item_vector(retriever: Retriever, item: int | None) -> np.ndarray | None:
    """The context item's own vector in the model's item table; None when there is no item or
    the model does not know it (a new item: the request goes on without it)."""
    if item is None or item not in retriever.index:
        return None
    return retriever.item_table[retriever.index[item]].numpy().astype(np.float32)


def user_vector(
    retriever: Retriever,
    context: UserContext,
    scenario: str = "",
    query_embedding: np.ndarray | None = None,
    context_item: int | None = None,
) -> np.ndarray | None:
    """Step 2: the user encoder over the history items it knows, for the request's surface
    (which a contextual model conditions on), fused with the user's long-term embedding where the
    model reads one; None when it knows none of the items.

    A model that reads the surface's context (``Retriever.query_text_dim`` > 0,
    ``Retriever.reads_context_items``) also gets the query's embedding and the context item
    (only one it knows); the retriever gives a model only what it reads."""
    return user_vectors(retriever, [context], [scenario], [query_embedding], [context_item])[0]


def user_vectors(
    retriever: Retriever,
    contexts: Sequence[UserContext],
    scenarios: Sequence[str],
    query_embeddings: Sequence[np.ndarray | None],
    context_items: Sequence[int | None],
) -> list[np.ndarray | None]:
    """Step 2 for a batch of requests (``user_vector`` of each): one encoder forward for the
    requests whose history carries timestamps and one for those without (the model reads no
    time bias for the latter, as for a single request)."""
    out: list[np.ndarray | None] = [None] * len(contexts)
    groups: dict[bool, list[tuple[int, list[int], list[float]]]] = {}
    for row, context in enumerate(contexts):
        times = context.times or [0.0] * len(context.history)
        held = retriever.index.rows(np.asarray(context.history, np.int64)) >= 0  # one lookup
        known = [
            (i, t) for i, t, ok in zip(context.history, times, held.tolist(), strict=True) if ok
        ]
        if known:
            groups.setdefault(bool(context.times), []).append(
                (row, [i for i, _ in known], [t for _, t in known])
            )
    for timed, members in groups.items():
        rows = [row for row, _, _ in members]
        vectors = retriever.user_vectors(
            [ids for _, ids, _ in members],
            [times for _, _, times in members] if timed else None,
            [scenarios[r] for r in rows],
            [contexts[r].long_term for r in rows],
            queries=[query_embeddings[r] for r in rows],
            context_items=[
                item if (item := context_items[r]) in retriever.index else None for r in rows
            ],
        )
        for row, vector in zip(rows, vectors, strict=True):
            out[row] = np.asarray(vector, dtype=np.float32)
    return out


def written_ads(
    generative: GenerativeAds,
    contexts: Sequence[UserContext],
    scenarios: Sequence[str],
    query_embeddings: Sequence[np.ndarray | None],
    context_items: Sequence[int | None],
) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Step 2 of the generative generator, for a batch of requests: each user's ads as its
    transducer writes them over the history items it knows, for the request's surface and
    context as ``user_vectors`` reads them (a generative model on the unified transducer
    conditions on them; the others ignore them), best first, with their scores
    (log-probabilities, or a dense head's); None for a user it knows nothing of."""
    states = user_vectors(
        generative.retriever, contexts, scenarios, query_embeddings, context_items
    )
    return generative.write(states)


def written_ad(
    generative: GenerativeAds | None,
    context: UserContext,
    scenario: str = "",
    query_embedding: np.ndarray | None = None,
    context_item: int | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """``written_ads`` for one request; None where the version has no generative generator."""
    if generative is None:
        return None
    return written_ads(generative, [context], [scenario], [query_embedding], [context_item])[0]


def check_context_item(
    item: int | None, ad_index: AdIndex | ShardedIndex, content: ContentGenerator
) -> None:
    """A context item must be an organic item, not an ad of this version.

    Raises:
        ConfigError: naming CONTEXT_ITEM_ID.
    """
    if item is None:
        return
    held = isinstance(ad_index, AdIndex) and item in ad_index  # shards: content.text has them
    if held or item in content.text:
        raise ConfigError(
            "CONTEXT_ITEM_ID",
            f"{item} is an ad; the context is the organic item the related page shows",
        )


@functools.lru_cache(maxsize=4)
def outside(ids: frozenset[int]) -> Callable[[np.ndarray], np.ndarray]:
    """ads -> which are not in ``ids``: sorted once per set (the standing ineligible set is one
    object across requests, and a frozenset hashes once), then a binary search per call."""
    return not_in(np.asarray(sorted(ids), np.int64))


def generate(
    context: UserContext,
    vector: np.ndarray | None,
    k: int,
    ad_index: AdIndex | ShardedIndex,
    content: ContentGenerator,
    popularity: PacingPopularity,
    ineligible: frozenset[int] | set[int],
    query_embedding: np.ndarray | None = None,
    item_vector: np.ndarray | None = None,
    eligibility: RequestEligibility | None = None,
    per_advertiser: int = 0,
    written: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, list[tuple[int, float]]]:
    """Step 3: up to ``k`` eligible candidates per generator, best first.

    ``generative`` takes the ads the generative model ``written`` for the user (``written_ads``),
    keeping those the request may be shown, in the order written.

    ``query`` (search) takes the query's MiniLM embedding against the content generator's index
    of the ads' text vectors; ``item`` (related) takes the context item's vector in the model's
    item table against the sequential ad index. Each runs only with its vector.

    Ads the user already engaged with and ineligible ads (paused, budget exhausted) are
    excluded at query time. Pass ``ineligible`` as a frozenset that lives across requests: the
    indexes then reuse its selector instead of rebuilding it per request. With the request's
    ``eligibility`` (targeting, delivery state, caps, hidden advertisers) every search stays
    inside its bitmap instead (with an index in shards, on what they answer), and
    ``ineligible`` is not consulted (the campaigns' state, which
    the bitmap holds, covers the ads' pauses); ``per_advertiser`` (the select step's limit for
    K) then also spreads the popularity floor over advertisers.
    """
    if not isinstance(ineligible, frozenset):
        ineligible = frozenset(ineligible)
    history = set(context.history)
    candidates: dict[str, list[tuple[int, float]]] = {}
    bitmaps: dict[str, np.ndarray] = {}

    def allowed(name: str) -> np.ndarray | None:
        if eligibility is None:
            return None
        if name not in bitmaps:
            bitmaps[name] = eligibility.bitmap(name)
        return bitmaps[name]

    def search(
        index: AdIndex | ShardedIndex, name: str, query: np.ndarray
    ) -> list[tuple[int, float]]:
        if isinstance(index, ShardedIndex):
            # Eligibility is kept here, on what the shards answer: the request's, or else the
            # ads not ineligible now.
            keep = eligibility.allows if eligibility is not None else outside(ineligible)
            ids, values = index.search(query, k, list(history), keep)
            return list(zip(ids.tolist(), values.tolist(), strict=True))
        found, scores = index.search(
            np.asarray(query, np.float32)[None], k, history, ineligible, allowed(name)
        )
        return list(zip(found[0].tolist(), scores[0].tolist(), strict=True))

    if vector is not None:
        candidates["sequential"] = search(ad_index, AD_INDEX, vector)
    candidates["content"] = content.candidates(
        context.history, context.affinity, k, history, ineligible, allowed(CONTENT_INDEX)
    )
    if query_embedding is not None:
        candidates["query"] = search(content.index, CONTENT_INDEX, query_embedding)
    if item_vector is not None:
        candidates["item"] = search(ad_index, AD_INDEX, item_vector)
    if written is not None:
        ads, scores = written
        keep = eligibility.allows(ads) if eligibility is not None else outside(ineligible)(ads)
        if history:
            keep &= ~np.isin(ads, np.fromiter(history, np.int64, len(history)))
        kept = np.flatnonzero(keep)[:k]
        candidates["generative"] = list(zip(ads[kept].tolist(), scores[kept].tolist(), strict=True))
    # Popularity is the floor under every answer (all a cold-start user gets), and costs next
    # to nothing to read deeper: deep enough that the select step's per-advertiser cap and
    # near-duplicate collapse can refill the answer from it.
    candidates["popularity"] = popularity.candidates(
        POPULARITY_DEPTH * k,
        history,
        ineligible,
        eligibility.allows if eligibility is not None else None,
        eligibility.advertisers if eligibility is not None else None,
        per_advertiser,
    )
    return candidates


def request_eligibility(
    eligibility: Eligibility, context: UserContext, surface: str
) -> RequestEligibility:
    """The request's eligibility: its segment (the user's profile, the surface) less the
    user's capped ads and hidden or capped advertisers."""
    return eligibility.request(
        {**context.profile, "surface": surface}, context.blocked_ads, context.blocked_advertisers
    )


def select(
    policy: QuotaPolicy,
    candidates: dict[str, list[tuple[int, float]]],
    surface: str,
    activity: int,
    k: int,
    rng: np.random.Generator,
    catalog: AdCatalog | None = None,
    diversity: DiversityConfig | None = None,
) -> list[Candidate]:
    """Step 4: the quota policy's K ads; with a ``catalog``, at most ``diversity``'s cap per
    advertiser per window of K and one of each near-duplicate group (the merge refills from the
    next candidates), spread so that the first window (the top 20) holds at most the cap of one
    advertiser (``spread``)."""
    if catalog is None or diversity is None:
        return policy.select(candidates, surface, activity, k, rng)
    every = [ad for found in candidates.values() for ad, _ in found]
    diversifier = Diversifier(catalog, diversity, k, every)
    chosen = policy.select(candidates, surface, activity, k, rng, admit=diversifier.admit)
    if len(chosen) < k and diversifier.deferred:
        # Only the generators the policy drew from (their ads are the ones held back).
        drawn = {c.source for c in chosen} or set(candidates)
        offered: dict[int, tuple[float, str]] = {}
        for source, found in candidates.items():
            for ad, score in found if source in drawn else ():
                offered.setdefault(ad, (score, source))
        held = [ad for ad in diversifier.deferred if ad in offered]
        diversifier.deferred = held
        extra = diversifier.refill([c.ad_id for c in chosen], k)
        chosen += [Candidate(ad, *offered[ad]) for ad in extra]
    return spread(chosen, catalog, diversity)


@dataclass
class RetrievalPipeline:
    """Everything a request needs, loaded once per model version; the Triton ensemble runs the
    same four steps (``user_context``, ``user_vector``, ``generate``, ``allocate``) as models.

    Args:
        retriever: the sequential model's user encoder (and its item vocabulary).
        ad_index: the ANN index over the model's ad embeddings (or its shards' servers).
        content: the content generator over ad text embeddings.
        popularity: the popularity/pacing fallback.
        features: where online features come from.
        quotas: how K is shared among the generators (fixed, learned, snake; overrides).
        max_k: the largest K a request may ask for.
        ineligible: ads that must not be returned now (paused, budget exhausted).
        seed: the seed of the Thompson-sampling draws (with the learned policy's exploration).
        query_encoder: embeds search queries (None: a request with a query is refused).
        eligibility: per-request eligibility over ``ad_index`` and ``content.index`` (None:
            only ``ineligible`` is enforced).
        caps: the frequency caps.
        catalog: the ads' advertisers and near-duplicate groups (None: no diversity step).
        diversity: per surface, the advertiser cap and near-duplicate collapse.
        generative: the generative generator (None: the version has none).
    """

    retriever: Retriever
    ad_index: AdIndex | ShardedIndex
    content: ContentGenerator
    popularity: PacingPopularity
    features: FeatureSource
    quotas: QuotaPolicy = field(default_factory=QuotaPolicy)
    max_k: int = 1_000
    ineligible: frozenset[int] | set[int] = frozenset()
    seed: int = 0
    query_encoder: QueryEncoder | None = None
    eligibility: Eligibility | None = None
    caps: FrequencyCaps = field(default_factory=FrequencyCaps)
    catalog: AdCatalog | None = None
    diversity: dict[str, DiversityConfig] = field(default_factory=dict)
    generative: GenerativeAds | None = None

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def retrieve(
        self,
        user_id: int,
        scenario: str,
        k: int,
        recent_item_ids: Sequence[int] = (),
        query: str | bytes | None = None,
        context_item_id: int | None = None,
    ) -> RetrievalResult:
        """Candidates for ``user_id`` on surface ``scenario``, with the surface's context: the
        search ``query``, the related page's ``context_item_id`` (contract.py says what each
        surface reads, and which misfits are flagged or refused).

        Raises:
            ConfigError: K outside 1..max_k, an unknown scenario, a bad query or context item
                (named in the message).
        """
        check_k(k, self.max_k)
        self.quotas.fixed.for_surface(scenario)  # an unknown surface is an error naming it
        surface = surface_context(
            scenario,
            parse_query(query) if query is not None else None,
            parse_context_item(int(context_item_id)) if context_item_id is not None else None,
        )
        check_context_item(surface.context_item, self.ad_index, self.content)
        context = user_context(self.features, user_id, recent_item_ids, self.caps)
        query_embedding = None
        if surface.query is not None:
            if self.query_encoder is None:
                raise CandgenError("query_encoder: this pipeline has none to embed the query")
            query_embedding = self.query_encoder.encode(surface.query)
        vector = user_vector(
            self.retriever, context, scenario, query_embedding, surface.context_item
        )
        item_vector = context_item_vector(self.retriever, surface.context_item)
        written = written_ad(
            self.generative, context, scenario, query_embedding, surface.context_item
        )
        candidates = generate(
            context,
            vector,
            k,
            self.ad_index,
            self.content,
            self.popularity,
            self.ineligible,
            query_embedding,
            item_vector,
            request_eligibility(self.eligibility, context, scenario)
            if self.eligibility is not None
            else None,
            2 * self.diversity[scenario].limit(k)  # as GeneratorsStep: room for duplicates
            if self.catalog is not None and scenario in self.diversity
            else 0,
            written,
        )
        chosen = select(
            self.quotas,
            candidates,
            scenario,
            context.activity,
            k,
            self.rng,
            self.catalog,
            self.diversity.get(scenario),
        )
        unknown = surface.context_item is not None and item_vector is None
        return RetrievalResult(
            ad_ids=[c.ad_id for c in chosen],
            scores=[c.score for c in chosen],
            sources=[c.source for c in chosen],
            cold_start=context.cold_start,
            fallback=context.fallback,
            source_counts=source_counts(chosen),
            quota_policy=self.quotas.source(scenario),
            flags=[*context.flags, *surface.flags, *([UNKNOWN_CONTEXT_ITEM] if unknown else [])],
        )
