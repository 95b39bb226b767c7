"""One retrieval request end to end, in library form (the Triton models are thin over it).

features (Feast feature server) -> user encoder -> candidates per generator (sequential ANN,
content, popularity/pacing) -> quota allocation per surface -> dedup and eligibility.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from candgen.features.client import FeatureStoreUnavailable
from candgen.index.ann import AdIndex
from candgen.serving.contract import check_k
from candgen.serving.generators import ContentGenerator, PacingPopularity
from candgen.serving.quota import QuotaPolicy, source_counts
from candgen.vocab import USER_SERVING_SERVICE

if TYPE_CHECKING:  # torch is imported only by the step that encodes
    from candgen.models.retriever import Retriever

USER_SERVICE = USER_SERVING_SERVICE
COLD_START, FALLBACK = "cold_start", "fallback"


class FeatureSource(Protocol):
    def lookup(self, service: str, entity: str, key: int) -> dict[str, Any] | None: ...


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
    """

    ad_ids: list[int]
    scores: list[float]
    sources: list[str]
    cold_start: bool = False
    fallback: bool = False
    source_counts: dict[str, int] = field(default_factory=dict)
    quota_policy: str = ""


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
    """

    history: list[int]
    times: list[float] | None = None
    affinity: list[float] | None = None
    long_term: list[float] | None = None
    activity: int = 0
    cold_start: bool = False
    fallback: bool = False

    @property
    def flags(self) -> list[str]:
        return [
            name for name, on in ((COLD_START, self.cold_start), (FALLBACK, self.fallback)) if on
        ]


def user_context(
    features: FeatureSource, user_id: int, recent_item_ids: Sequence[int] = ()
) -> UserContext:
    """Step 1: the user's online features joined with the request's real-time items."""
    fallback = False
    try:
        feats = features.lookup(USER_SERVICE, "user_id", int(user_id))
    except FeatureStoreUnavailable:
        feats, fallback = None, True
    stored = list((feats or {}).get("recent_item_ids") or [])
    stored_times = list((feats or {}).get("recent_timestamps") or [])
    history = [*map(int, stored), *map(int, recent_item_ids)]
    # Real-time items carry no timestamp here: they happened just now.
    now = max(stored_times, default=0.0)
    times = [*map(float, stored_times), *[float(now)] * len(recent_item_ids)]
    affinity = (feats or {}).get("category_affinity")
    long_term = (feats or {}).get("long_term_embedding")
    lifetime = sum(int((feats or {}).get(k) or 0) for k in ("engagements_total", "ad_clicks_total"))
    return UserContext(
        history=history,
        times=times if times and len(times) == len(history) else None,
        affinity=[float(a) for a in affinity] if affinity is not None else None,
        long_term=[float(v) for v in long_term] if long_term else None,
        activity=lifetime + len(recent_item_ids),
        cold_start=feats is None and not recent_item_ids and not fallback,
        fallback=fallback,
    )


def user_vector(
    retriever: Retriever, context: UserContext, scenario: str = ""
) -> np.ndarray | None:
    """Step 2: the user encoder over the history items it knows, for the request's surface
    (which a contextual model conditions on), fused with the user's long-term embedding where the
    model reads one; None when it knows none of the items."""
    times = context.times or [0.0] * len(context.history)
    known = [(i, t) for i, t in zip(context.history, times, strict=True) if i in retriever.index]
    if not known:
        return None
    ids = [i for i, _ in known]
    query = retriever.user_vectors(
        [ids], [[t for _, t in known]] if context.times else None, [scenario], [context.long_term]
    )
    return np.asarray(query[0], dtype=np.float32)


def generate(
    context: UserContext,
    vector: np.ndarray | None,
    k: int,
    ad_index: AdIndex,
    content: ContentGenerator,
    popularity: PacingPopularity,
    ineligible: frozenset[int] | set[int],
) -> dict[str, list[tuple[int, float]]]:
    """Step 3: up to ``k`` eligible candidates per generator, best first.

    Ads the user already engaged with and ineligible ads (paused, budget exhausted) are
    excluded at query time. Pass ``ineligible`` as a frozenset that lives across requests: the
    indexes then reuse its selector instead of rebuilding it per request.
    """
    if not isinstance(ineligible, frozenset):
        ineligible = frozenset(ineligible)
    history = set(context.history)
    candidates: dict[str, list[tuple[int, float]]] = {}
    if vector is not None:
        found, scores = ad_index.search(vector[None], k, history, ineligible)
        candidates["sequential"] = list(zip(found[0].tolist(), scores[0].tolist(), strict=True))
    candidates["content"] = content.candidates(
        context.history, context.affinity, k, history, ineligible
    )
    candidates["popularity"] = popularity.candidates(k, history, ineligible)
    return candidates


@dataclass
class RetrievalPipeline:
    """Everything a request needs, loaded once per model version; the Triton ensemble runs the
    same four steps (``user_context``, ``user_vector``, ``generate``, ``allocate``) as models.

    Args:
        retriever: the sequential model's user encoder (and its item vocabulary).
        ad_index: the ANN index over the model's ad embeddings.
        content: the content generator over ad text embeddings.
        popularity: the popularity/pacing fallback.
        features: where online features come from.
        quotas: how K is shared among the generators (fixed, learned, snake; overrides).
        max_k: the largest K a request may ask for.
        ineligible: ads that must not be returned now (paused, budget exhausted).
        seed: the seed of the Thompson-sampling draws (with the learned policy's exploration).
    """

    retriever: Retriever
    ad_index: AdIndex
    content: ContentGenerator
    popularity: PacingPopularity
    features: FeatureSource
    quotas: QuotaPolicy = field(default_factory=QuotaPolicy)
    max_k: int = 1_000
    ineligible: frozenset[int] | set[int] = frozenset()
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def retrieve(
        self,
        user_id: int,
        scenario: str,
        k: int,
        recent_item_ids: Sequence[int] = (),
    ) -> RetrievalResult:
        """Candidates for ``user_id`` on surface ``scenario``.

        Raises:
            ConfigError: K outside 1..max_k or an unknown scenario (named in the message).
        """
        check_k(k, self.max_k)
        self.quotas.fixed.for_surface(scenario)  # an unknown surface is an error naming it
        context = user_context(self.features, user_id, recent_item_ids)
        vector = user_vector(self.retriever, context, scenario)
        candidates = generate(
            context, vector, k, self.ad_index, self.content, self.popularity, self.ineligible
        )
        chosen = self.quotas.select(candidates, scenario, context.activity, k, self.rng)
        return RetrievalResult(
            ad_ids=[c.ad_id for c in chosen],
            scores=[c.score for c in chosen],
            sources=[c.source for c in chosen],
            cold_start=context.cold_start,
            fallback=context.fallback,
            source_counts=source_counts(chosen),
            quota_policy=self.quotas.source(scenario),
        )
