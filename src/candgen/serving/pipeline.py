"""One retrieval request end to end, in library form (the Triton models are thin over it).

features (Feast feature server) -> user encoder -> candidates per generator (sequential ANN,
content, popularity/pacing) -> quota allocation per surface -> dedup and eligibility.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from candgen.errors import ConfigError
from candgen.index.ann import AdIndex
from candgen.registry.retriever import Retriever
from candgen.serving.features import FeatureStoreUnavailable
from candgen.serving.generators import ContentGenerator, PacingPopularity
from candgen.serving.quota import QuotaConfig, allocate

USER_SERVICE = "user_features_v1"


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
    """

    ad_ids: list[int]
    scores: list[float]
    sources: list[str]
    cold_start: bool = False
    fallback: bool = False


@dataclass
class RetrievalPipeline:
    """Everything a request needs, loaded once per model version.

    Args:
        retriever: the sequential model's user encoder (and its item vocabulary).
        ad_index: the ANN index over the model's ad embeddings.
        content: the content generator over ad text embeddings.
        popularity: the popularity/pacing fallback.
        features: where online features come from.
        quotas: per-surface generator weights.
        max_k: the largest K a request may ask for.
        ineligible: ads that must not be returned now (paused, budget exhausted).
    """

    retriever: Retriever
    ad_index: AdIndex
    content: ContentGenerator
    popularity: PacingPopularity
    features: FeatureSource
    quotas: QuotaConfig = field(default_factory=QuotaConfig)
    max_k: int = 1_000
    ineligible: set[int] = field(default_factory=set)

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
        if not 0 < k <= self.max_k:
            raise ConfigError("K", f"must be in 1..{self.max_k}, got {k}")
        weights = self.quotas.for_surface(scenario)
        fallback = False
        try:
            feats = self.features.lookup(USER_SERVICE, "user_id", int(user_id))
        except FeatureStoreUnavailable:
            feats, fallback = None, True
        stored = list((feats or {}).get("recent_item_ids") or [])
        stored_times = list((feats or {}).get("recent_timestamps") or [])
        history = [*stored, *map(int, recent_item_ids)]
        # Real-time items carry no timestamp here: they happened just now.
        now = max(stored_times, default=0.0)
        times = [*map(float, stored_times), *[now] * len(recent_item_ids)]
        if len(times) != len(history):
            times = []
        affinity = (feats or {}).get("category_affinity")
        exclude = self.ineligible | set(history)

        candidates: dict[str, list[tuple[int, float]]] = {}
        known = [(i, t) for i, t in zip(history, times or [0.0] * len(history), strict=True)
                 if int(i) in self.retriever.index]  # fmt: skip
        if known:
            ids = [i for i, _ in known]
            query = self.retriever.user_vectors([ids], [[t for _, t in known]] if times else None)
            found, scores = self.ad_index.search(query, k, exclude)
            candidates["sequential"] = list(zip(found[0].tolist(), scores[0].tolist(),
                                                strict=True))  # fmt: skip
        candidates["content"] = self.content.candidates(history, affinity, k, exclude)
        candidates["popularity"] = self.popularity.candidates(k, exclude)
        chosen = allocate(candidates, weights, k)
        return RetrievalResult(
            ad_ids=[c.ad_id for c in chosen],
            scores=[c.score for c in chosen],
            sources=[c.source for c in chosen],
            cold_start=feats is None and not recent_item_ids and not fallback,
            fallback=fallback,
        )
