"""The non-model candidate generators: content (ad text, for cold start) and popularity/pacing.

Both use only numpy and FAISS, so they run inside the Triton runtime. The sequential generator is
the user encoder plus the ad index (``candgen.models.retriever`` / ``candgen.index.ann``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from candgen.errors import ConfigError
from candgen.index.ann import AdIndex, IndexConfig


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


class ContentGenerator:
    """Ads whose text is close to what the user engaged with; new ads are found at once.

    The query is the mean text embedding of the user's recent ads that have text; a user with
    none gets their category affinity mixed over per-category centroids of ad text, and a user
    with neither gets no content candidates.

    Args:
        ad_ids: (N,) ad ids.
        text_embeddings: (N, T) ad text embeddings (e.g. MiniLM, 384-d).
        categories: (N,) category index of each ad, in 0..C-1 (C = the affinity vector's length).
        num_categories: C.
        config: index settings (cosine = inner product on normalised vectors).
    """

    def __init__(
        self,
        ad_ids: np.ndarray,
        text_embeddings: np.ndarray,
        categories: np.ndarray,
        num_categories: int,
        config: IndexConfig | None = None,
    ) -> None:
        if not len(ad_ids) == len(text_embeddings) == len(categories):
            raise ConfigError("ad_ids", "ad_ids, text_embeddings and categories differ in length")
        if len(categories) and (categories.min() < 0 or categories.max() >= num_categories):
            raise ConfigError("categories", f"must lie in 0..{num_categories - 1}")
        vectors = _normalise(np.asarray(text_embeddings, dtype=np.float32))
        self.index = AdIndex.build(np.asarray(ad_ids, np.int64), vectors, config)
        self.text = dict(zip(np.asarray(ad_ids).tolist(), vectors, strict=True))
        self.centroids = np.zeros((num_categories, vectors.shape[1]), dtype=np.float32)
        np.add.at(self.centroids, categories, vectors)
        self.centroids = _normalise(self.centroids)

    def save(self, folder: Path) -> None:
        """Writes the index, the normalised text vectors and the category centroids."""
        folder = Path(folder)
        self.index.save(folder / "content.faiss")
        ids = np.fromiter(self.text, dtype=np.int64, count=len(self.text))
        vectors = np.stack(list(self.text.values())) if len(ids) else self.centroids[:0]
        np.savez(folder / "content.npz", ad_ids=ids, vectors=vectors, centroids=self.centroids)

    @classmethod
    def load(cls, folder: Path, config: IndexConfig | None = None) -> ContentGenerator:
        """Reads what ``save`` wrote (no rebuild: a large HNSW index loads in seconds)."""
        folder = Path(folder)
        arrays = np.load(folder / "content.npz")
        obj = cls.__new__(cls)
        obj.index = AdIndex.load(folder / "content.faiss", config)
        obj.text = dict(zip(arrays["ad_ids"].tolist(), arrays["vectors"], strict=True))
        obj.centroids = arrays["centroids"]
        return obj

    def add(self, ad_id: int, text_embedding: np.ndarray) -> None:
        """A new ad: retrievable by content from the next request on."""
        vec = _normalise(np.asarray(text_embedding, dtype=np.float32)[None])
        self.index.add([ad_id], vec)
        self.text[int(ad_id)] = vec[0]

    def query(
        self, recent_ids: Iterable[int], category_affinity: Iterable[float] | None
    ) -> np.ndarray | None:
        """The content query for a user, or None when nothing is known about them."""
        known = [self.text[i] for i in map(int, recent_ids) if i in self.text]
        if known:
            return _normalise(np.mean(known, axis=0))
        if category_affinity is not None:
            aff = np.asarray(list(category_affinity), dtype=np.float32)
            if aff.shape == (len(self.centroids),) and aff.sum() > 0:
                return _normalise(aff @ self.centroids)
        return None

    def candidates(
        self,
        recent_ids: Iterable[int],
        category_affinity: Iterable[float] | None,
        k: int,
        exclude: Iterable[int] = (),
        ineligible: frozenset[int] = frozenset(),
        allowed: np.ndarray | None = None,
    ) -> list[tuple[int, float]]:
        """Up to ``k`` ads nearest the user's content query (``AdIndex.search``'s exclusions and
        ``allowed`` bitmap apply)."""
        q = self.query(recent_ids, category_affinity)
        if q is None:
            return []
        ids, scores = self.index.search(q[None], k, exclude, ineligible, allowed)
        return list(zip(ids[0].tolist(), scores[0].tolist(), strict=True))


class PacingPopularity:
    """The fallback generator: ads by smoothed recent CTR, damped as their budget runs out.

    score = (clicks + prior_clicks) / (impressions + prior_impressions) * pacing, where pacing is
    1 while at least half the budget is left and falls linearly to 0 at an empty budget, so a
    popular ad that is about to exhaust its budget is not pushed to every user.

    Args:
        ad_ids: (N,) ad ids.
        clicks: (N,) recent clicks.
        impressions: (N,) recent impressions.
        budget_left_fraction: (N,) share of the budget left, in [0, 1].
    """

    def __init__(
        self,
        ad_ids: np.ndarray,
        clicks: np.ndarray,
        impressions: np.ndarray,
        budget_left_fraction: np.ndarray,
        prior_clicks: float = 1.0,
        prior_impressions: float = 100.0,
    ) -> None:
        ctr = (np.asarray(clicks, float) + prior_clicks) / (
            np.asarray(impressions, float) + prior_impressions
        )
        pacing = np.clip(2.0 * np.clip(np.asarray(budget_left_fraction, float), 0, 1), 0, 1)
        score = ctr * pacing
        order = np.lexsort((np.asarray(ad_ids), -score))  # ties: lower id first
        order = order[score[order] > 0]
        self.ids = np.asarray(ad_ids, np.int64)[order]
        self.scores = score[order]

    def candidates(
        self,
        k: int,
        exclude: Iterable[int] = (),
        ineligible: frozenset[int] = frozenset(),
        allows: Callable[[np.ndarray], np.ndarray] | None = None,
        advertisers: Callable[[np.ndarray], np.ndarray] | None = None,
        per_advertiser: int = 0,
    ) -> list[tuple[int, float]]:
        """The ``k`` best-ranked ads not excluded, not ineligible and, with ``allows`` (ad ids
        -> which may be returned: a request's eligibility), allowed; with ``advertisers`` (ad
        ids -> advertiser ids) at most ``per_advertiser`` of one advertiser, so that the floor
        under an answer is never all taken by a few advertisers the select step caps."""
        if k <= 0:
            raise ConfigError("k", f"must be > 0, got {k}")
        skip = set(map(int, exclude))
        out: list[tuple[int, float]] = []
        if allows is not None:
            # Vectorised in blocks: most of a long ranking may be ineligible for one request,
            # and a Python loop over it was half the generators step (serving_notes.md, 9).
            skipped = np.fromiter(skip, np.int64, len(skip))
            kept_advertisers = np.zeros(0, np.int64)
            for lo in range(0, len(self.ids), 4 * k):
                ids = self.ids[lo : lo + 4 * k]
                ok = allows(ids)
                if len(skipped):
                    ok &= ~np.isin(ids, skipped)
                rows = np.flatnonzero(ok)
                if per_advertiser and advertisers is not None and len(rows):
                    owners = advertisers(ids[rows])
                    under = _under_cap(owners, kept_advertisers, per_advertiser)
                    rows = rows[under]
                    kept_advertisers = np.concatenate([kept_advertisers, owners[under]])
                rows = rows[: k - len(out)]
                out += zip(ids[rows].tolist(), self.scores[lo + rows].tolist(), strict=True)
                if len(out) == k:
                    break
            return out
        for lo in range(0, len(self.ids), 4 * k):
            ids, scores = self.ids[lo : lo + 4 * k].tolist(), self.scores[lo : lo + 4 * k].tolist()
            for ad, score in zip(ids, scores, strict=True):
                if ad not in skip and ad not in ineligible:
                    out.append((ad, score))
                    if len(out) == k:
                        return out
        return out

    @property
    def ranked(self) -> list[tuple[int, float]]:
        """Every ad with a positive score and its score, best first (built on each call: the
        serving path reads the arrays ``ids`` and ``scores``)."""
        return list(zip(self.ids.tolist(), self.scores.tolist(), strict=True))


def _under_cap(owners: np.ndarray, earlier: np.ndarray, cap: int) -> np.ndarray:
    """Which of ``owners`` (advertisers, in rank order; -1: unknown) stay within ``cap`` ads per
    advertiser, counting ``earlier`` (those already taken) first."""
    owners = np.asarray(owners, np.int64)
    order = np.argsort(owners, kind="stable")
    ranked = owners[order]
    first = np.r_[True, ranked[1:] != ranked[:-1]] if len(ranked) else np.zeros(0, bool)
    starts = np.maximum.accumulate(np.where(first, np.arange(len(ranked)), 0))
    seen = np.empty(len(owners), np.int64)
    seen[order] = np.arange(len(ranked)) - starts  # earlier ads of the same owner in this block
    if len(earlier):
        taken, counts = np.unique(earlier, return_counts=True)
        at = np.minimum(np.searchsorted(taken, owners), len(taken) - 1)
        seen += np.where(taken[at] == owners, counts[at], 0)
    keep: np.ndarray = (owners < 0) | (seen < cap)
    return keep
