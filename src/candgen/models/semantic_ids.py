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
    """The semantic IDs that exist, as a prefix tree: which tokens may follow a prefix, so that
    a generator's beam search only ever builds IDs of real items (and, given a subset, of the
    ads a request may get).

    Args:
        ids: (n, length) semantic IDs (``SemanticIds.assign``), one row per item.
        items: (n,) the item id of each row.
    """

    def __init__(self, ids: np.ndarray, items: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        items = np.asarray(items, np.int64)
        if ids.ndim != 2 or len(ids) != len(items):
            raise ConfigError("ids", f"need (n, length) IDs, one per item, got {ids.shape}")
        self.length = int(ids.shape[1])
        self._next: dict[tuple[int, ...], np.ndarray] = {}
        self._item: dict[tuple[int, ...], int] = {}
        for row, item in zip(ids.tolist(), items.tolist(), strict=True):
            key = tuple(row)
            if key in self._item:
                raise ConfigError("ids", f"items {self._item[key]} and {item} share the ID {row}")
            self._item[key] = item
        for level in range(self.length):
            prefixes: dict[tuple[int, ...], set[int]] = {}
            for key in self._item:
                prefixes.setdefault(key[:level], set()).add(key[level])
            for prefix, tokens in prefixes.items():
                self._next[prefix] = np.asarray(sorted(tokens), np.int64)

    def allowed(self, prefix: tuple[int, ...]) -> np.ndarray:
        """The tokens that may follow ``prefix`` (none: no item's ID starts so)."""
        return self._next.get(tuple(prefix), np.zeros(0, np.int64))

    def item(self, full_id: tuple[int, ...]) -> int | None:
        """The item a complete ID names, or None."""
        return self._item.get(tuple(full_id))


def constrained_beam_search(
    next_log_probs: Callable[[list[tuple[int, ...]]], np.ndarray],
    trie: IdTrie,
    beam_width: int,
    k: int,
) -> list[tuple[int, float]]:
    """The ``k`` best items by the summed log-probability of their IDs' tokens, found by beam
    search that extends each prefix only with the tokens ``trie`` allows.

    Args:
        next_log_probs: prefixes (all of one length) -> (len(prefixes), vocab) log-probabilities
            of the next token (the generative model's step).
        trie: the IDs that may be generated.
        beam_width: prefixes kept after each step (at least ``k``).
        k: items returned.

    Returns:
        Up to ``k`` (item id, score) pairs, best first.
    """
    if k < 1 or beam_width < k:
        raise ConfigError("beam_width", f"must be >= k >= 1, got beam {beam_width}, k {k}")
    beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    for _ in range(trie.length):
        scores = np.asarray(next_log_probs([prefix for prefix, _ in beams]), np.float64)
        grown: list[tuple[tuple[int, ...], float]] = []
        for (prefix, score), row in zip(beams, scores, strict=True):
            tokens = trie.allowed(prefix)
            if len(tokens) and tokens[-1] >= len(row):
                raise ConfigError(
                    "next_log_probs", f"{len(row)} tokens a step, but the IDs use {tokens[-1]}"
                )
            grown += [((*prefix, int(t)), score + float(row[t])) for t in tokens.tolist()]
        grown.sort(key=lambda beam: -beam[1])
        beams = grown[:beam_width]
        if not beams:
            return []
    found = [(trie.item(prefix), score) for prefix, score in beams]
    return [(item, score) for item, score in found if item is not None][:k]
