"""The non-model candidate generators: content (ad text, for cold start) and popularity/pacing.

Both use only numpy and FAISS, so they run inside the Triton runtime. The sequential generator is
the user encoder plus the ad index (``candgen.models.retriever`` / ``candgen.index.ann``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from candgen.data.ids import SortedIds
from candgen.errors import ConfigError
from candgen.index.ann import AdIndex, IndexConfig, VectorFile

TEXT_FILE = "text_vectors.npy"  # beside content.npz: read by row when a generator loads


class TextVectors(Mapping[int, np.ndarray]):
    """The ads' text vectors by ad id: sorted ids over one array, which a loaded generator
    reads from disk a row at a time (``VectorFile``), so that its process holds only the rows
    a request reads (the whole array is 1.5 GB of float32 at 1M ads of 384-d MiniLM text, 15 GB
    at 10M; a dict of per-ad arrays held all of it), and a dict of the ads added since. Not a
    memory map: with this machine's 8 MB readahead each row read through one added about 1.6
    MB of mapped pages to the process, 33 MB a request (serving_notes.md, 17).

    Args:
        ad_ids: (N,) ad ids, sorted and unique.
        vectors: (N, T) their vectors, in the same order (in memory, or a ``VectorFile``).
    """

    def __init__(self, ad_ids: np.ndarray, vectors: np.ndarray | VectorFile) -> None:
        ids = np.asarray(ad_ids, np.int64)
        if len(ids) != len(vectors):
            raise ConfigError("ad_ids", f"{len(ids)} ad ids for {len(vectors)} text vectors")
        if len(ids) > 1 and not (np.diff(ids) > 0).all():
            raise ConfigError("ad_ids", "text vectors' ad ids must be sorted and unique")
        self.ids, self.vectors = ids, vectors
        self._find = SortedIds(ids)
        self.added: dict[int, np.ndarray] = {}

    @classmethod
    def of(cls, ad_ids: np.ndarray, vectors: np.ndarray) -> TextVectors:
        """From ads in any order (each id once)."""
        ids = np.asarray(ad_ids, np.int64)
        order = np.argsort(ids, kind="stable")
        if len(ids) > 1 and (np.diff(ids[order]) == 0).any():
            raise ConfigError("ad_ids", "an ad id appears more than once")
        return cls(ids[order], np.asarray(vectors)[order])

    def _row(self, ad_id: int) -> int:
        return int(self._find.rows(np.asarray([ad_id]))[0])

    def __getitem__(self, ad_id: int) -> np.ndarray:
        ad_id = int(ad_id)
        if ad_id in self.added:
            return self.added[ad_id]
        row = self._row(ad_id)
        if row < 0:
            raise KeyError(ad_id)
        vector: np.ndarray = self._read(np.asarray([row]))[0]
        return vector

    def _read(self, rows: np.ndarray) -> np.ndarray:
        if isinstance(self.vectors, VectorFile):
            return self.vectors.read(rows)
        return np.asarray(self.vectors[rows], np.float32)

    def __contains__(self, ad_id: object) -> bool:
        if not isinstance(ad_id, int | np.integer):
            return False
        return int(ad_id) in self.added or self._row(int(ad_id)) >= 0

    def __iter__(self) -> Iterator[int]:
        yield from (int(i) for i in self.ids if int(i) not in self.added)
        yield from self.added

    def __len__(self) -> int:
        return len(self.ids) + sum(1 for a in self.added if self._row(a) < 0)

    def take(self, ad_ids: np.ndarray) -> np.ndarray:
        """The vectors of these ads, zeros for an ad without one (vectorised: a lookup per ad
        took seconds over a million)."""
        return self.lookup(ad_ids)[0]

    def lookup(self, ad_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The vectors of these ads (zeros for an ad without one) and which ads have one, in
        one search and one read."""
        ids = np.asarray(ad_ids, np.int64)
        out = np.zeros((len(ids), self.vectors.shape[1]), np.float32)
        rows = self._find.rows(ids)
        found = rows >= 0
        if found.any():
            out[found] = self._read(rows[found])
        if self.added:
            for i, ad in enumerate(ids.tolist()):
                if ad in self.added:
                    out[i] = self.added[ad]
                    found[i] = True
        return out, found

    def add(self, ad_id: int, vector: np.ndarray) -> None:
        """An ad's text vector, new or replacing its stored one."""
        self.added[int(ad_id)] = np.asarray(vector, np.float32)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every ad's id and vector, ids sorted (the stored ones read in full)."""
        if not self.added:
            if isinstance(self.vectors, VectorFile):
                return self.ids, self.vectors.read(slice(0, len(self.ids)))
            return self.ids, np.asarray(self.vectors, np.float32)
        ids = np.fromiter(self, np.int64, len(self))
        return TextVectors.of(ids, np.stack([self[i] for i in ids.tolist()])).arrays()


def _check_inputs(
    ad_ids: np.ndarray,
    text: np.ndarray | VectorFile,
    categories: np.ndarray,
    num_categories: int,
) -> None:
    if not len(ad_ids) == len(text) == len(categories):
        raise ConfigError("ad_ids", "ad_ids, text_embeddings and categories differ in length")
    if len(categories) and (categories.min() < 0 or categories.max() >= num_categories):
        raise ConfigError("categories", f"must lie in 0..{num_categories - 1}")


def _category_sums(categories: np.ndarray, vectors: np.ndarray, n: int) -> np.ndarray:
    """(n, T): the sum of each category's vectors, as products with the categories' one-hot
    matrix a block of rows at a time (``np.add.at`` over 500,000 rows of 384-d text took
    seconds)."""
    categories = np.asarray(categories)
    sums = np.zeros((n, vectors.shape[1]), np.float32)
    for lo in range(0, len(categories), _SUM_BLOCK):  # the one-hot block: at most 6 MB at C 24
        one_hot = np.eye(n, dtype=np.float32)[categories[lo : lo + _SUM_BLOCK]]
        sums += one_hot.T @ np.asarray(vectors[lo : lo + _SUM_BLOCK], np.float32)
    return sums


_SUM_BLOCK = 65_536


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
        _check_inputs(ad_ids, text_embeddings, categories, num_categories)
        vectors = _normalise(np.asarray(text_embeddings, dtype=np.float32))
        self.index = AdIndex.build(np.asarray(ad_ids, np.int64), vectors, config)
        self.text = TextVectors.of(np.asarray(ad_ids, np.int64), vectors)
        self.centroids = _normalise(_category_sums(categories, vectors, num_categories))

    @classmethod
    def from_file(
        cls,
        ad_ids: np.ndarray,
        text_file: Path,
        categories: np.ndarray,
        num_categories: int,
        config: IndexConfig | None = None,
        progress: bool = False,
    ) -> ContentGenerator:
        """A generator over more text than memory holds (15 GB at 10M ads of 384-d MiniLM).

        ``text_file`` becomes its text store: a (N, T) float32 .npy whose rows follow
        ``ad_ids`` (sorted), normalised in place a block at a time where they are not unit
        length, indexed from disk (``AdIndex.build`` over a ``VectorFile``) and read a row at
        a time. ``save`` into the folder that holds it writes no second copy.

        Args:
            ad_ids: (N,) ad ids, sorted and unique.
            text_file: the ads' text embeddings.
            categories: (N,) category index of each ad, in 0..C-1.
            num_categories: C.
            config: index settings.
            progress: progress bars while normalising and indexing.
        """
        from tqdm.auto import tqdm

        text_file = Path(text_file)
        source = VectorFile(text_file)
        ids = np.asarray(ad_ids, np.int64)
        _check_inputs(ids, source, categories, num_categories)
        text = TextVectors(ids, source)  # refuses unsorted ids
        centroids = np.zeros((num_categories, source.shape[1]), dtype=np.float32)
        step = (config or IndexConfig()).build_chunk
        for lo in tqdm(range(0, len(ids), step), desc="text vectors", disable=not progress):
            block = source.read(slice(lo, lo + step))
            unit = _normalise(block)
            if not np.allclose(unit, block, atol=1e-6):  # written only where not unit length
                stored = np.load(text_file, mmap_mode="r+")
                stored[lo : lo + len(unit)] = unit
                stored.flush()
                del stored
            centroids += _category_sums(categories[lo : lo + step], unit, num_categories)
        obj = cls.__new__(cls)
        obj.index = AdIndex.build(ids, source, config, progress=progress)
        obj.text = text
        obj.centroids = _normalise(centroids)
        return obj

    def save(self, folder: Path) -> None:
        """Writes the index, the normalised text vectors (``TEXT_FILE``, ids sorted) and the
        category centroids."""
        folder = Path(folder)
        self.index.save(folder / "content.faiss")
        target = folder / TEXT_FILE
        stored = self.text.vectors
        if isinstance(stored, VectorFile) and not self.text.added:
            if stored.path.resolve() != target.resolve():
                shutil.copyfile(stored.path, target)  # streamed: never whole in memory
            ids = self.text.ids
        else:
            ids, vectors = self.text.arrays()
            if not len(ids):
                vectors = self.centroids[:0]
            np.save(target, np.ascontiguousarray(vectors, np.float32))
        np.savez(folder / "content.npz", ad_ids=ids, centroids=self.centroids)

    @classmethod
    def load(cls, folder: Path, config: IndexConfig | None = None) -> ContentGenerator:
        """Reads what ``save`` wrote (no rebuild: a large HNSW index loads in seconds); the
        text vectors stay on disk, read a row at a time (an older export's, inside content.npz,
        are read in full)."""
        folder = Path(folder)
        arrays = np.load(folder / "content.npz")
        obj = cls.__new__(cls)
        obj.index = AdIndex.load(folder / "content.faiss", config)
        if (folder / TEXT_FILE).exists():
            obj.text = TextVectors(arrays["ad_ids"], VectorFile(folder / TEXT_FILE))
        else:
            obj.text = TextVectors.of(arrays["ad_ids"], arrays["vectors"])
        obj.centroids = arrays["centroids"]
        return obj

    def add(self, ad_id: int, text_embedding: np.ndarray) -> None:
        """A new ad: retrievable by content from the next request on."""
        vec = _normalise(np.asarray(text_embedding, dtype=np.float32)[None])
        self.index.add([ad_id], vec)
        self.text.add(ad_id, vec[0])

    def query(
        self, recent_ids: Iterable[int], category_affinity: Iterable[float] | None
    ) -> np.ndarray | None:
        """The content query for a user, or None when nothing is known about them."""
        vectors, known = self.text.lookup(np.fromiter(map(int, recent_ids), np.int64))
        if known.any():  # one search and one read for all of them
            return _normalise(vectors[known].mean(axis=0))
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
        self.scores = score[order].astype(np.float32)  # served as float32: half the memory

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
