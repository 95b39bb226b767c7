"""Semantic IDs: each item as a short tuple of codes, by residual k-means over its embedding.

The first code is the item's cluster among ``codebook_size`` centroids, the next the cluster of
what the first centroid leaves unexplained, and so on for ``levels`` levels (residual
quantisation, as TIGER's RQ-VAE without the learned encoder). Items that end up with the same
codes get one more token, 0, 1, 2, ... in id order, so that every item has its own ID
(TIGER's collision token). Codes come from the embedding alone, so an item (or ad) that has
never been seen gets its ID from its content embedding on its first day. ``IdTrie`` and
``constrained_beam_search`` generate only IDs that exist (or, from a subset, only eligible ones).

numpy and FAISS's k-means only: the ID table is built at training and read at serving.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from candgen.errors import ConfigError, DataFormatError


@dataclass(frozen=True)
class SemanticIdConfig:
    """How semantic IDs are built.

    Attributes:
        levels: codes per item before the collision token.
        codebook_size: centroids per level (each code is in 0..codebook_size-1).
        iterations: k-means iterations per level.
        seed: k-means seed (the same embeddings and seed give the same IDs).
    """

    levels: int = 3
    codebook_size: int = 256
    iterations: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("levels", "codebook_size", "iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}")


class SemanticIds:
    """Residual k-means codebooks and the IDs they give.

    Args:
        codebooks: one (codebook_size, dim) array of centroids per level.
    """

    def __init__(self, codebooks: list[np.ndarray]) -> None:
        if not codebooks:
            raise ConfigError("codebooks", "need at least one level")
        widths = {c.shape[1] for c in codebooks}
        if len(widths) != 1 or any(c.ndim != 2 for c in codebooks):
            raise ConfigError("codebooks", "every level must be a (size, dim) array of one dim")
        self.codebooks = [np.ascontiguousarray(c, np.float32) for c in codebooks]

    @property
    def dim(self) -> int:
        return int(self.codebooks[0].shape[1])

    @classmethod
    def fit(cls, embeddings: np.ndarray, config: SemanticIdConfig | None = None) -> SemanticIds:
        """Codebooks trained on ``embeddings`` (n, dim), one level at a time on the residuals.

        A level never has more centroids than there are items.
        """
        import faiss

        config = config or SemanticIdConfig()
        residual = _checked(embeddings, None).copy()
        if not len(residual):
            raise ConfigError("embeddings", "need at least one item to fit semantic IDs")
        codebooks = []
        for level in range(config.levels):
            k = min(config.codebook_size, len(residual))
            kmeans = faiss.Kmeans(
                residual.shape[1], k, niter=config.iterations, seed=config.seed + level,
                verbose=False, min_points_per_centroid=1, max_points_per_centroid=1 << 30,
            )  # fmt: skip
            kmeans.train(residual)
            centroids = np.ascontiguousarray(kmeans.centroids, np.float32)
            codebooks.append(centroids)
            residual -= centroids[_nearest(residual, centroids)]
        return cls(codebooks)

    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, levels) codes: each level's nearest centroid to what the earlier ones left."""
        residual = _checked(embeddings, self.dim).copy()
        codes = np.empty((len(residual), len(self.codebooks)), np.int64)
        for level, centroids in enumerate(self.codebooks):
            codes[:, level] = _nearest(residual, centroids)
            residual -= centroids[codes[:, level]]
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, dim) the embeddings the codes stand for: the sum of their centroids."""
        codes = np.asarray(codes, np.int64)
        if codes.ndim != 2 or codes.shape[1] < len(self.codebooks):
            raise ConfigError("codes", f"expected (n, >= {len(self.codebooks)}), got {codes.shape}")
        out = np.zeros((len(codes), self.dim), np.float32)
        for level, centroids in enumerate(self.codebooks):
            out += centroids[codes[:, level]]
        return out

    def assign(self, item_ids: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """(n, levels + 1) IDs, unique per item: the codes, then 0, 1, ... among the items with
        the same codes, in item id order."""
        ids = np.asarray(item_ids, np.int64)
        if ids.ndim != 1 or len(ids) != len(embeddings):
            raise ConfigError("item_ids", f"need one id per embedding ({len(embeddings)})")
        if len(np.unique(ids)) != len(ids):
            raise ConfigError("item_ids", "item ids repeat")
        codes = self.encode(embeddings)
        order = np.lexsort((ids, *codes.T[::-1]))  # by codes, then by item id
        ranked = codes[order]
        first = np.r_[True, (ranked[1:] != ranked[:-1]).any(axis=1)] if len(order) else []
        starts = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
        token = np.empty(len(order), np.int64)
        token[order] = np.arange(len(order)) - starts
        return np.concatenate([codes, token[:, None]], axis=1)

    def save(self, path: Path) -> None:
        np.savez(Path(path), *self.codebooks)

    @classmethod
    def load(cls, path: Path) -> SemanticIds:
        try:
            with np.load(Path(path)) as stored:
                return cls([stored[f"arr_{i}"] for i in range(len(stored.files))])
        except (OSError, ValueError, KeyError) as e:
            raise DataFormatError(
                str(path), None, f"not a semantic ID codebook file: {e}"
            ) from None


def _checked(embeddings: np.ndarray, dim: int | None) -> np.ndarray:
    x = np.asarray(embeddings, np.float32)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, dim)"
        raise ConfigError("embeddings", f"expected {want}, got {x.shape}")
    if not np.isfinite(x).all():
        raise ConfigError("embeddings", "embeddings hold NaN or infinity")
    return x


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each row's nearest centroid (squared L2), a block of rows at a time."""
    out = np.empty(len(x), np.int64)
    norms = (centroids**2).sum(axis=1)
    for lo in range(0, len(x), 65_536):
        block = x[lo : lo + 65_536]
        out[lo : lo + len(block)] = np.argmin(norms[None] - 2.0 * block @ centroids.T, axis=1)
    return out


class IdTrie:
    """The semantic IDs that exist, as sorted integer keys of every prefix: which tokens may
    follow a prefix, so that a generator's beam search only ever builds IDs of real items (and,
    given a subset, of the ads a request may get).

    A prefix is one integer, its tokens in mixed radix (``vocab_sizes``), so that a batch of
    beams is checked against the IDs with one ``searchsorted`` a level.

    Args:
        ids: (n, length) semantic IDs (``SemanticIds.assign``), one row per item.
        items: (n,) the item id of each row.
        vocab_sizes: tokens per position (default: what ``ids`` uses); a generator's step
            returns that many log-probabilities.
    """

    def __init__(
        self, ids: np.ndarray, items: np.ndarray, vocab_sizes: tuple[int, ...] | None = None
    ) -> None:
        ids = np.asarray(ids, np.int64)
        items = np.asarray(items, np.int64)
        if ids.ndim != 2 or len(ids) != len(items) or not len(ids):
            raise ConfigError("ids", f"need (n, length) IDs, one per item, got {ids.shape}")
        if ids.min() < 0:
            raise ConfigError("ids", "tokens must be >= 0")
        sizes = tuple(int(v) for v in (vocab_sizes or ids.max(axis=0) + 1))
        if len(sizes) != ids.shape[1] or (ids >= np.asarray(sizes)).any():
            raise ConfigError("vocab_sizes", f"{sizes} do not hold the IDs' tokens")
        if np.prod(np.asarray(sizes, np.float64)) >= 2.0**62:
            raise ConfigError("vocab_sizes", f"{sizes}: too many IDs for one int64 key")
        self.length = ids.shape[1]
        self.vocab_sizes = sizes
        keys = np.zeros(len(ids), np.int64)
        self._prefixes: list[np.ndarray] = []
        for level, size in enumerate(sizes):
            keys = keys * size + ids[:, level]
            self._prefixes.append(np.unique(keys))
        order = np.argsort(keys, kind="stable")
        self._keys, self._items = keys[order], items[order]
        repeated = np.flatnonzero(self._keys[1:] == self._keys[:-1])
        if len(repeated):
            i = repeated[0]
            raise ConfigError(
                "ids",
                f"items {self._items[i]} and {self._items[i + 1]} share the ID {ids[order[i]]}",
            )
        # Per level, each prefix's next tokens as one row of bits: a beam's tokens are then
        # one search and one row read (searching every beam x token key was a third of a
        # request's beam search at width 400; docs/benchmarks/serving_notes.md, 18). A million
        # 4-token IDs with 256-token levels hold about 40 MB of rows.
        self._parents: list[np.ndarray] = [np.zeros(1, np.int64), *self._prefixes[:-1]]
        self._children: list[np.ndarray] = []
        for level, size in enumerate(sizes):
            parents, keys = self._parents[level], self._prefixes[level]
            rows = np.searchsorted(parents, keys // size)
            bits = np.zeros((len(parents), size), bool)
            bits[rows, keys % size] = True
            self._children.append(np.packbits(bits, axis=1))

    def allowed(self, prefixes: np.ndarray, level: int) -> np.ndarray:
        """(n, vocab_sizes[level]) which tokens may follow each of ``prefixes`` (n keys of
        ``level`` tokens; 0 is the empty prefix)."""
        prefixes = np.asarray(prefixes, np.int64)
        parents = self._parents[level]
        at = np.minimum(np.searchsorted(parents, prefixes), len(parents) - 1)
        bits = np.unpackbits(self._children[level][at], axis=1, count=self.vocab_sizes[level])
        found: np.ndarray = bits.astype(bool) & (parents[at] == prefixes)[:, None]
        return found

    def items(self, keys: np.ndarray) -> np.ndarray:
        """The item each complete ID key names (-1: none)."""
        keys = np.asarray(keys, np.int64)
        at = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        return np.where(self._keys[at] == keys, self._items[at], -1)


def constrained_beam_search(
    next_log_probs: Callable[[np.ndarray, np.ndarray], np.ndarray],
    trie: IdTrie,
    queries: int,
    beam_width: int,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best items of each query by the summed log-probability of their IDs' tokens,
    found by beam search that extends each prefix only with the tokens ``trie`` allows.

    Args:
        next_log_probs: (rows, prefixes) -> log-probabilities of the next token: ``rows`` (n,)
            says which query each of the ``prefixes`` (n, level) belongs to; the result is
            (n, trie.vocab_sizes[level]) (the generative model's step).
        trie: the IDs that may be generated.
        queries: how many queries to search for.
        beam_width: prefixes kept per query after each step (at least ``k``).
        k: items returned per query.

    Returns:
        (queries, k) item ids, best first (-1 where fewer than ``k`` IDs exist), and their
        (queries, k) scores (-inf there).
    """
    if k < 1 or beam_width < k:
        raise ConfigError("beam_width", f"must be >= k >= 1, got beam {beam_width}, k {k}")
    scores = np.zeros((queries, 1))
    keys = np.zeros((queries, 1), np.int64)
    tokens = np.zeros((queries, 1, 0), np.int64)
    for level, size in enumerate(trie.vocab_sizes):
        beams = scores.shape[1]
        rows = np.repeat(np.arange(queries), beams)
        step = np.asarray(next_log_probs(rows, tokens.reshape(queries * beams, level)))
        if step.shape != (queries * beams, size):
            raise ConfigError(
                "next_log_probs",
                f"returned {step.shape}; level {level} needs ({queries * beams}, {size})",
            )
        # Only the (beam, token) pairs the trie allows are candidates, and the choice is made
        # among them alone: where a level is a collision counter (1,075 tokens at a million
        # ads) a beam allows a handful (docs/benchmarks/serving_notes.md, 19).
        allowed = trie.allowed(keys.ravel(), level) & np.isfinite(scores.ravel())[:, None]
        beam, token = np.nonzero(allowed)  # in query order: beam = query * beams + b
        total = scores.ravel()[beam] + step[beam, token].astype(np.float64)
        query = beam // beams
        counts = np.bincount(query, minlength=queries)
        first = np.cumsum(counts) - counts
        candidates = np.full((queries, max(int(counts.max(initial=0)), 1)), -np.inf)
        candidates[query, np.arange(len(beam)) - first[query]] = total
        keep = min(beam_width, beams * size)
        take = min(keep, candidates.shape[1])
        top = np.argpartition(-candidates, take - 1, axis=1)[:, :take]
        q, slot = np.nonzero(top < counts[:, None])
        picked = first[q] + top[q, slot]
        parent, token = beam[picked], token[picked]
        scores = np.full((queries, keep), -np.inf)
        scores[q, slot] = total[picked]
        grown = np.zeros((queries, keep), np.int64)
        grown[q, slot] = keys.ravel()[parent] * size + token
        written = np.zeros((queries, keep, level + 1), np.int64)
        written[q, slot] = np.concatenate(
            [tokens.reshape(queries * beams, level)[parent], token[:, None]], axis=1
        )
        keys, tokens = grown, written
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    q = np.arange(queries)[:, None]
    best, items = scores[q, order], trie.items(keys[q, order])
    items[~np.isfinite(best)] = -1
    best[items < 0] = -np.inf
    if best.shape[1] < k:
        pad = k - best.shape[1]
        items = np.pad(items, ((0, 0), (0, pad)), constant_values=-1)
        best = np.pad(best, ((0, 0), (0, pad)), constant_values=-np.inf)
    return items, best


@dataclass(frozen=True)
class SemanticIdTable:
    """Every item's semantic ID, as a file: what a generative model trains on and serves.

    Args:
        item_ids: (n,) the items' external ids.
        ids: (n, levels + 1) their IDs (``SemanticIds.assign``).
        codebooks: the codebooks that gave them (new items get theirs from these).
        source: where the embeddings came from (the model file), for lineage.
    """

    item_ids: np.ndarray
    ids: np.ndarray
    codebooks: SemanticIds
    source: str = ""

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {
            f"codebook_{i}": c for i, c in enumerate(self.codebooks.codebooks)
        }
        arrays.update(item_ids=self.item_ids, ids=self.ids, source=np.array(self.source))
        with Path(path).open("wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path | str) -> SemanticIdTable:
        try:
            with np.load(Path(path)) as stored:
                levels = sum(name.startswith("codebook_") for name in stored.files)
                books = [stored[f"codebook_{i}"] for i in range(levels)]
                table = cls(
                    stored["item_ids"], stored["ids"], SemanticIds(books), str(stored["source"])
                )
        except (OSError, ValueError, KeyError) as e:
            raise DataFormatError(str(path), None, f"not a semantic ID table: {e}") from None
        if table.ids.ndim != 2 or len(table.ids) != len(table.item_ids):
            raise DataFormatError(str(path), None, "ids and item_ids do not match")
        if len(table.ids) and table.ids.min() < 0:
            raise DataFormatError(str(path), None, "ids hold negative tokens")
        if len(np.unique(table.item_ids)) != len(table.item_ids):
            raise DataFormatError(str(path), None, "item_ids repeat")
        return table

    def aligned(self, item_ids: np.ndarray) -> np.ndarray:
        """(len(item_ids), levels + 1) the IDs of ``item_ids`` (a data set's (N + 1,) external
        ids; row 0, padding, gets zeros).

        Raises:
            ConfigError: an item has no ID in this table.
        """
        wanted = np.asarray(item_ids, np.int64)[1:]
        order = np.argsort(self.item_ids, kind="stable")
        known = self.item_ids[order]
        at = np.minimum(np.searchsorted(known, wanted), len(known) - 1)
        missing = known[at] != wanted
        if missing.any():
            raise ConfigError(
                "semantic_ids",
                f"{int(missing.sum())} items have no ID in the table (first: "
                f"{int(wanted[missing][0])}); build it from a model of this data set",
            )
        out = np.zeros((len(wanted) + 1, self.ids.shape[1]), np.int64)
        out[1:] = self.ids[order[at]]
        return out
