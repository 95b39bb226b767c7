"""A FAISS index over ad embeddings that grows and shrinks in place.

The metric is always inner product: cosine models hand in L2-normalised vectors (so inner
product is cosine) and dot-product models are scored as trained. Small corpora use exact search;
larger ones HNSW, or, when memory matters, IVF-PQ (optionally OPQ-rotated, with an HNSW coarse
quantizer for many cells) whose candidates are re-scored from a compact copy of the vectors
(``refine``: 8-bit, 16-bit or full precision) so that recall holds at a fraction of the memory.
A large corpus is built from a ``VectorFile`` a chunk at a time: the coarse quantizer and the
codes are trained on a sample, and no more than one chunk of float vectors is held beside the
index. Ineligible ads (paused, budget exhausted) are
excluded at query time (a bitmap over the index's positions; on a GPU, whose indexes take no
selector, by over-fetching and keeping the allowed ones), never by rebuilding. New ads are added and
expired ads removed in place; HNSW cannot delete, so its removed ids are excluded at query time
like ineligible ones until the next rebuild compacts them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast

import numpy as np

from candgen.data.ids import SortedIds
from candgen.errors import ConfigError

if TYPE_CHECKING:  # faiss loads when an index is built or read, not with this module
    import faiss

    # (ineligible set, tombstone count) -> both as sorted ids
    _Standing = tuple[tuple[frozenset[int], int], np.ndarray]

KINDS = ("auto", "flat", "hnsw", "ivfpq")
QUANTIZERS = ("flat", "hnsw")
REFINES = ("none", "sq8", "fp16", "flat")
FILTER_MODES = ("auto", "selector", "overfetch")
# Over-fetch: the first search asks for OVERFETCH * k, each next one OVERFETCH times more, up
# to MAX_FETCH (FAISS's GPU k-selection takes at most 2048); past it, an exact search on the CPU
# copy over the allowed ads answers.
OVERFETCH, MAX_FETCH = 4, 2048


def next_fetch(fetch: int, k: int, cap: int = MAX_FETCH) -> int:
    """How many to ask for next while over-fetching ``k`` (``fetch`` 0: the first ask): at
    least ``k``, else ``OVERFETCH`` times more than the last ask, at most ``cap``."""
    return max(k, min(OVERFETCH * (fetch or k), cap))


INDEX_FILE = "ads.faiss"  # a saved index: this file and ids_file() beside it


def ids_file(index_path: Path) -> Path:
    """The live and removed ids saved beside an index file."""
    return Path(index_path).with_suffix(".ids.npz")


SEARCH_SETTINGS: Final = ("ef_search", "nprobe", "refine_factor")  # how, not what, is searched


@dataclass(frozen=True)
class IndexConfig:
    """How to index a corpus.

    Attributes:
        kind: auto (flat up to ``exact_max`` vectors, else hnsw; flat always on a GPU), flat,
            hnsw or ivfpq.
        exact_max: the largest corpus that ``auto`` searches exactly on a CPU.
        hnsw_m: HNSW graph degree.
        ef_construction: HNSW build beam.
        ef_search: HNSW search beam (raise it for recall, lower it for speed).
        ivf_nlist: IVF cells; 0 means 4 * sqrt(corpus size).
        ivf_quantizer: how IVF finds a vector's cells: flat (exact, over every centroid) or
            hnsw (a graph over the centroids: IVF-HNSW-PQ, for many cells).
        pq_m: PQ sub-quantizers (must divide the dimension).
        opq: rotate vectors before PQ (OPQ) so that its sub-vectors carry equal variance.
        nprobe: IVF cells visited per query.
        refine: how IVF-PQ's candidates are re-scored: none (PQ scores), or from a copy of the
            vectors in sq8 (8 bits per dimension), fp16 or flat (float32). At 1M ads x 64,
            16-byte codes alone found 59% of the exact top 100, with fp16 re-scoring 97% (sq8:
            95%, at 64 bytes an ad less); at 10M, 32-byte codes with fp16 99.7%, with sq8 94.6%
            whatever the factor (docs/BENCHMARKS.md, "Scale").
        refine_factor: candidates fetched per result for re-scoring (k * refine_factor).
        train_size: vectors sampled to train IVF-PQ (cells, codes, OPQ, sq8 ranges); 0 means
            min(corpus, max(64 * cells, 65,536)).
        build_chunk: vectors added per step when building (at most this many vectors in
            memory beside the index).
        device: cpu or cuda (FAISS GPU, exact search; needs a FAISS build with GPU support).
        filter_mode: how a search keeps to the allowed ads: selector (FAISS filtered search, the
            search itself skips the others; CPU only), overfetch (search unfiltered for more
            than ``k``, keep the allowed, search again for more if too few; FAISS's GPU indexes
            take no selector), or auto (selector on the CPU, overfetch on a GPU).
    """

    kind: str = "auto"
    exact_max: int = 200_000
    hnsw_m: int = 32
    ef_construction: int = 200
    # 1M ads, a user encoder's queries, efConstruction 200: recall@100 0.88 at 128, 0.97 at
    # 256, 0.99 at 512 on one build; 0.86, 0.94, 0.97 (at 384), 0.985 on a rebuild with another
    # encoder (docs/BENCHMARKS.md, serving ensemble): export a large corpus with --ef-search
    # chosen on its own queries. The generators step searches its content index with the same
    # search settings (SEARCH_SETTINGS).
    ef_search: int = 256
    ivf_nlist: int = 0
    ivf_quantizer: str = "flat"
    pq_m: int = 16
    opq: bool = False
    nprobe: int = 32
    refine: str = "fp16"
    refine_factor: int = 4
    train_size: int = 0
    build_chunk: int = 500_000
    device: str = "cpu"
    filter_mode: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError("kind", f"{self.kind!r} is not one of {KINDS}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError("device", f"{self.device!r} is not one of ('cpu', 'cuda')")
        if self.device == "cuda" and self.kind not in ("auto", "flat"):
            raise ConfigError("kind", f"a cuda index searches exactly (flat), got {self.kind!r}")
        if self.filter_mode not in FILTER_MODES:
            raise ConfigError("filter_mode", f"{self.filter_mode!r} is not one of {FILTER_MODES}")
        if self.device == "cuda" and self.filter_mode == "selector":
            raise ConfigError(
                "filter_mode", "FAISS's GPU indexes take no selector: use overfetch (or auto)"
            )
        if self.ivf_quantizer not in QUANTIZERS:
            raise ConfigError("ivf_quantizer", f"{self.ivf_quantizer!r} is not one of {QUANTIZERS}")
        if self.refine not in REFINES:
            raise ConfigError("refine", f"{self.refine!r} is not one of {REFINES}")
        positive = ("exact_max", "hnsw_m", "ef_construction", "ef_search", "pq_m", "nprobe")
        for name in (*positive, "refine_factor", "build_chunk", "ivf_nlist", "train_size"):
            value, low = getattr(self, name), 0 if name in ("ivf_nlist", "train_size") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(name, f"must be an integer >= {low}, got {value!r}")
        if not isinstance(self.opq, bool):
            raise ConfigError("opq", f"must be true or false, got {self.opq!r}")

    def searching(self) -> IndexConfig:
        """Only how this config searches (``SEARCH_SETTINGS``), on the CPU: for another index
        whose kind is its own, as the generators step's text index beside its ads index."""
        return IndexConfig(**{name: getattr(self, name) for name in SEARCH_SETTINGS})

    @property
    def overfetch(self) -> bool:
        """Whether searches keep to the allowed ads by over-fetching (see ``filter_mode``)."""
        return self.filter_mode == "overfetch" or (
            self.filter_mode == "auto" and self.device == "cuda"
        )

    def resolved_kind(self, n: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "flat" if self.device == "cuda" or n <= self.exact_max else "hnsw"


class AdIndex:
    """Inner-product search over (ad id, vector) pairs with query-time exclusions.

    Args:
        dim: vector width.
        config: index settings.
        expected_size: corpus size used to pick the index kind (and IVF cells).
    """

    def __init__(self, dim: int, config: IndexConfig | None = None, expected_size: int = 0):
        import faiss

        self.faiss = faiss
        self.dim = dim
        self.config = config or IndexConfig()
        self.kind = self.config.resolved_kind(expected_size)
        base: faiss.Index
        self._refine: RefineStore | None = None
        if self.kind == "hnsw":
            base = faiss.IndexHNSWFlat(dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efConstruction = self.config.ef_construction
        elif self.kind == "ivfpq":
            base = self._ivfpq(dim, expected_size)
            if self.config.refine != "none":
                self._refine = RefineStore(self.config.refine, dim)
        else:
            base = faiss.IndexFlatIP(dim)
        if self.config.device == "cuda":
            base = _to_gpu(faiss, base)
        # An IndexIDMap(2) over base; load() gives what read_index returns, or its GPU copy.
        # IVF-PQ and HNSW take IndexIDMap: IndexIDMap2's reverse map (for reconstruct by id,
        # which nothing here asks) costs about 40 bytes an ad, more than PQ's codes.
        self.index: faiss.Index = (
            faiss.IndexIDMap2(base) if self.kind == "flat" else faiss.IndexIDMap(base)
        )
        self._base: faiss.Index = base
        self._tombstones: set[int] = set()
        self._standing: _Standing | None = None  # see _standing_ids
        self._positions: np.ndarray | None = None  # ad id at each internal position
        self._layout = (np.zeros(0, np.int64), SortedIds(np.zeros(0, np.int64)))  # see positions
        self._host: faiss.Index | None = None  # a GPU index's CPU copy (see _host_index)
        self._graph_quantizer: bool | None = None  # IVF's quantizer is HNSW (see _ivf_params)
        self._live: tuple[np.ndarray, int, np.ndarray] | None = None  # see _live_bits
        self._standing_bitmap: tuple[frozenset[int], np.ndarray, np.ndarray] | None = None
        self.exact_fallbacks = 0  # filtered searches answered exactly instead (see search)

    def _ivfpq(self, dim: int, expected_size: int) -> faiss.Index:
        """An untrained IVF-PQ (OPQ-rotated, over an HNSW quantizer, as configured)."""
        lib, cfg = self.faiss, self.config
        if dim % cfg.pq_m:
            raise ConfigError("pq_m", f"{cfg.pq_m} does not divide dim {dim}")
        nlist = cfg.ivf_nlist or max(1, int(4 * np.sqrt(max(expected_size, 1))))
        quantizer: Any
        if cfg.ivf_quantizer == "hnsw":
            quantizer = lib.IndexHNSWFlat(dim, 32, lib.METRIC_INNER_PRODUCT)
            quantizer.hnsw.efSearch = 64
        else:
            quantizer = lib.IndexFlatIP(dim)
        # faiss's constructors keep a reference to the quantizer (and the OPQ matrix and IVF).
        ivf: Any = lib.IndexIVFPQ(quantizer, dim, nlist, cfg.pq_m, 8, lib.METRIC_INNER_PRODUCT)
        if cfg.ivf_quantizer == "hnsw":
            # k-means assigns the training sample exactly; the graph is built once, over the
            # final centroids. A plain pointer in faiss: this object keeps it alive.
            self._clustering = lib.IndexFlatIP(dim)
            ivf.clustering_index = self._clustering
        index: faiss.Index = ivf
        if cfg.opq:
            index = lib.IndexPreTransform(lib.OPQMatrix(dim, cfg.pq_m), ivf)
        return index

    @property
    def _ivf(self) -> faiss.IndexIVF:
        """The IVF inside an IVF-PQ index (under its OPQ rotation, if any)."""
        return self.faiss.extract_index_ivf(self._base)

    @classmethod
    def build(
        cls,
        ids: np.ndarray,
        vectors: np.ndarray | VectorFile,
        config: IndexConfig | None = None,
        progress: bool = False,
    ) -> AdIndex:
        """An index holding ``vectors`` under ``ids``.

        IVF-PQ is trained on a sample first (``IndexConfig.train_size``); vectors are added
        ``IndexConfig.build_chunk`` at a time, so a ``VectorFile`` (a .npy on disk) is never
        read whole.

        Args:
            ids: (n,) ad ids.
            vectors: (n, dim) float vectors, in memory or a ``VectorFile``.
            config: index settings.
            progress: show a progress bar while adding.
        """
        ids = np.asarray(ids, np.int64)
        if len(ids) != len(vectors):
            raise ConfigError("ids", f"{len(ids)} ids for {len(vectors)} vectors")
        if len(np.unique(ids)) != len(ids):  # here: a repeat across chunks is no replacement
            raise ConfigError("ids", "ids repeat")
        dim = vectors.shape[1]
        index = cls(dim, config, expected_size=len(ids))
        cfg = index.config
        if index.kind == "ivfpq":
            nlist = index._ivf.nlist
            size = min(len(ids), cfg.train_size or max(64 * nlist, 65_536))
            rows = np.sort(np.random.default_rng(0).choice(len(ids), size, replace=False))
            sample = index._check(ids[rows], _rows(vectors, rows))[1]
            if len(sample) < nlist:
                raise ConfigError(
                    "ivf_nlist",
                    f"{nlist} cells need at least as many training vectors, got {len(sample)}",
                )
            index._base.train(sample)
            if index._refine is not None:
                index._refine.train(sample)
                index._refine.reserve(len(ids))
            del sample
        from tqdm.auto import tqdm

        step = cfg.build_chunk
        with tqdm(
            total=len(ids), desc=f"indexing ({index.kind})", unit="ad", disable=not progress
        ) as bar:
            for lo in range(0, len(ids), step):
                hi = min(lo + step, len(ids))
                index.add(ids[lo:hi], _rows(vectors, slice(lo, hi)))
                bar.update(hi - lo)
        return index

    def __len__(self) -> int:
        return len(self.positions()) - len(self._tombstones)

    def __contains__(self, ad_id: int) -> bool:
        ad_id = int(ad_id)
        return bool(self.position_of(np.asarray([ad_id]))[0] >= 0) and (
            ad_id not in self._tombstones
        )

    def _check(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ConfigError("vectors", f"expected shape (n, {self.dim}), got {vectors.shape}")
        if len(ids) != len(vectors):
            raise ConfigError("ids", f"{len(ids)} ids for {len(vectors)} vectors")
        if len(np.unique(ids)) != len(ids):
            raise ConfigError("ids", "ids repeat within one call")
        if (ids < 0).any():
            raise ConfigError("ids", "ids must be >= 0 (FAISS uses -1 for 'no result')")
        if not np.isfinite(vectors).all():
            raise ConfigError("vectors", "vectors hold NaN or infinity")
        return ids, vectors

    def add(self, ids: Iterable[int] | np.ndarray, vectors: np.ndarray) -> None:
        """Adds ads (an id already present is replaced); they are searchable at once."""
        ids, vectors = self._check(
            np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids), vectors
        )
        present = ids[self.position_of(ids) >= 0].tolist() if len(self.positions()) else []
        if present and self._tombstoned:
            raise ConfigError(
                "ids",
                f"a {self.kind} index on the {self.config.device} cannot replace ads in place "
                f"({present[:5]}...); rebuild the index",
            )
        if present:
            self.index.remove_ids(self.faiss.IDSelectorBatch(np.asarray(present, np.int64)))
        # The refine rows and the positions first: a search never meets a position it cannot
        # re-score or map to its ad (positions of ads not yet in FAISS are never answered).
        if self._refine is not None:
            self._refine.add(vectors)
        if present or self._positions is None:
            self._positions = None
        else:
            self._append_layout(ids)
            self._extend_standing(ids)
        try:
            self.index.add_with_ids(vectors, ids)
        except RuntimeError:  # FAISS refused: the layout is read again from its id map
            self._positions = None
            raise
        self._host = None

    def _append_layout(self, ids: np.ndarray) -> None:
        """The cached positions with ``ids`` appended, and merged into their sorted copy."""
        old, found = self._layout
        positions = np.concatenate([old, ids])
        self._layout = (positions, found.appended(ids))  # one assignment, as in positions()
        self._positions = positions

    @property
    def _tombstoned(self) -> bool:
        """Whether removed ads stay in the index as tombstones, kept out at query time: HNSW
        cannot delete; IVF's lists keep their old numbering where IndexIDMap's id map is
        compacted; FAISS's GPU indexes implement no removal."""
        return self.kind in ("hnsw", "ivfpq") or self.config.device == "cuda"

    def remove(self, ids: Iterable[int]) -> int:
        """Removes ads; returns how many were present."""
        asked = np.unique(np.fromiter((int(i) for i in ids), np.int64))
        held = asked[self.position_of(asked) >= 0].tolist()
        gone = [i for i in held if i not in self._tombstones]
        if not gone:
            return 0
        if self._tombstoned:
            self._tombstones.update(gone)
            self._clear_standing(self.position_of(np.asarray(gone, np.int64)))
        else:
            self.index.remove_ids(self.faiss.IDSelectorBatch(np.asarray(gone, np.int64)))
            self._positions = self._host = None
        return len(gone)

    def positions(self) -> np.ndarray:
        """The ad id at each internal position: what a per-request eligibility bitmap
        (``search``'s ``allowed``) is laid over. HNSW's removed ads keep their positions."""
        if self._positions is None:
            # A GPU index's IndexIDMap wrapper stays on the CPU, its ids with it.
            id_map = cast("faiss.IndexIDMap", self.index).id_map
            positions = self.faiss.vector_to_array(id_map).astype(np.int64)
            # One assignment: a reader on another thread sees both arrays or neither.
            self._layout = (positions, SortedIds(positions))
            self._positions = positions
        return self._positions

    def position_of(self, ids: np.ndarray) -> np.ndarray:
        """Each ad's internal position, -1 for an ad the index does not hold."""
        self.positions()
        return self._layout[1].rows(ids)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Iterable[int] = (),
        ineligible: frozenset[int] = frozenset(),
        allowed: np.ndarray | None = None,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Top-``k`` ads per query, best first, skipping ``exclude`` and ``ineligible``.

        Args:
            queries: (n, dim) query vectors.
            k: results per query.
            exclude: per-request exclusions (e.g. the user's own history; small).
            ineligible: ads that no request may get now (paused, budget exhausted). Its
                bitmap (its sorted ids, when over-fetching) is built once and reused while the
                same frozenset is passed, so a large set costs nothing per query.
            allowed: instead of ``ineligible``, the request's own eligibility: a bitmap over
                internal positions (``positions()``; bit ``p % 8`` of byte ``p // 8``) of the
                ads it may get. The search stays inside it (FAISS filtered search; with
                ``IndexConfig.overfetch``, as on a GPU, unfiltered searches for more than ``k``
                whose allowed ads are kept); where the search comes back with fewer than ``k``
                while more are allowed (HNSW's beam, IVF's probed cells, ``MAX_FETCH``
                over-fetched), the query is answered over every allowed ad on the CPU (exactly
                for flat and HNSW; IVF-PQ by its codes over all its cells, then re-scored), so
                an answer is short only when fewer than ``k`` ads are allowed.

        Returns:
            Per query, the ad ids and scores; fewer than ``k`` where fewer ads qualify (FAISS's
            -1 padding is dropped, never returned).
        """
        if k <= 0:
            raise ConfigError("k", f"must be > 0, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ConfigError("queries", f"expected shape (n, {self.dim}), got {queries.shape}")
        k_eff = min(k, max(len(self), 1))
        if allowed is not None:
            return self._search_allowed(queries, k_eff, exclude, allowed)
        exclude = list(exclude)
        gpu_beyond_k = self.config.device == "cuda" and k_eff > MAX_FETCH
        if not (ineligible or exclude or self._tombstones or gpu_beyond_k):
            scores, found = self._knn(self.index, queries, k_eff, self._params(None), by_id=True)
            keep = [row >= 0 for row in found]
            return [f[m] for f, m in zip(found, keep, strict=True)], [
                sc[m] for sc, m in zip(scores, keep, strict=True)
            ]
        if self.config.overfetch:
            dropped = self._excluded_ids(ineligible, exclude)

            def all_but_excluded() -> np.ndarray:
                bits = np.full((len(self.positions()) + 7) // 8, 255, np.uint8)
                clear_bits(bits, self.position_of(dropped))
                return bits

            return self._search_overfetch(queries, k_eff, not_in(dropped), all_but_excluded)
        # A bitmap over positions: one bit test per scanned vector, where an id selector of the
        # removed and ineligible ads cost 2.8 times the search with 1% of the ads removed
        # (serving_notes.md, 14).
        standing = self._standing_bits(ineligible)
        return self._search_allowed(queries, k_eff, exclude, standing, standing=True)

    def _search_allowed(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Iterable[int],
        allowed: np.ndarray,
        standing: bool = False,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``search`` inside a bitmap over positions. ``standing``: one of ``_standing_bits``
        (the removed ads already cleared), for a search with no ``allowed`` of its own, which
        keeps to what the index's own search finds (HNSW's beam, IVF's probed cells): the
        exhaustive answer is for a request's narrow eligibility, not for every short search
        (a shard asked for 2,048 would scan all its codes)."""
        positions = self.positions()
        n = len(positions)
        bits = np.asarray(allowed)
        if bits.dtype != np.uint8 or bits.ndim != 1 or len(bits) < (n + 7) // 8:
            raise ConfigError(
                "allowed", f"must be a uint8 bitmap of {n} bits, got {bits.dtype} {bits.shape}"
            )
        if self._tombstones and not standing:
            live = self._live_bits()
            bits = np.bitwise_and(bits[: len(live)], live)
        drop = list(exclude)
        if drop:
            bits = bits.copy()
            clear_bits(bits, self.position_of(np.asarray(drop, np.int64)))
        if self.config.overfetch:

            def keep_allowed(ids: np.ndarray) -> np.ndarray:
                at = self.position_of(ids)
                kept: np.ndarray = (at >= 0) & ((bits[at >> 3] >> (at & 7)) & 1).astype(bool)
                return kept

            return self._search_overfetch(queries, k, keep_allowed, lambda: bits, popcount(bits, n))
        # FAISS's size is the bitmap's length in bytes.
        sel = self.faiss.IDSelectorBitmap(len(bits), self.faiss.swig_ptr(bits))
        scores, found = self._knn(self._base, queries, k, self._params(sel), by_id=False)
        out_ids, out_scores = [], []
        allowed_count: list[int] = []  # popcount(bits), once per call where needed

        def more_allowed(than: int) -> bool:
            if not allowed_count:
                allowed_count.append(popcount(bits, n))
            return allowed_count[0] > than

        for q, row_pos, row_scores in zip(queries, found, scores, strict=True):
            keep = row_pos >= 0
            short = not keep.all() and self.kind != "flat" and not standing
            if short and more_allowed(int(keep.sum())):
                # HNSW's beam (IVF's probed cells) can end where the filter empties it: answer
                # over every allowed ad instead (exactly; IVF-PQ over all its cells).
                self.exact_fallbacks += 1
                row_scores, row_pos = self._search_everywhere(q, k, sel)
                keep = row_pos >= 0
            out_ids.append(positions[row_pos[keep]])
            out_scores.append(row_scores[keep])
        return out_ids, out_scores

    def _search_overfetch(
        self,
        queries: np.ndarray,
        k: int,
        keep: Callable[[np.ndarray], np.ndarray],
        allowed_bits: Callable[[], np.ndarray],
        allowed: int | None = None,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Top-``k`` of the ads that ``keep`` (ids -> mask) lets through, by unfiltered searches
        for more than ``k``; a query still short at ``MAX_FETCH`` is answered exactly over
        ``allowed_bits()`` (a bitmap over positions; built once per call) on the CPU copy.
        ``allowed``: how many ads ``keep`` lets through, where known (an answer holding them
        all is complete); a GPU index asked for more than ``MAX_FETCH`` answers exactly."""
        total = len(self.positions())
        out_ids: list[np.ndarray] = [np.zeros(0, np.int64)] * len(queries)
        out_scores: list[np.ndarray] = [np.zeros(0, np.float32)] * len(queries)
        pending = np.arange(len(queries) if total else 0)
        enough = min(k, allowed if allowed is not None else k)
        bits: list[np.ndarray] = []  # allowed_bits(), once

        def exact(q: int) -> tuple[np.ndarray, np.ndarray]:
            self.exact_fallbacks += 1
            if not bits:
                bits.append(allowed_bits())
            return self._exact_over(queries[q], k, bits[0])

        if self.config.device == "cuda" and k > MAX_FETCH:  # past FAISS's GPU k-selection
            for q in pending.tolist():
                out_ids[q], out_scores[q] = exact(q)
            return out_ids, out_scores
        fetch = min(total, next_fetch(0, k))
        while len(pending):
            params = None
            if self.kind == "hnsw":  # the beam must hold what is fetched
                ef = max(self.config.ef_search, fetch)
                params = self.faiss.SearchParametersHNSW(efSearch=ef)  # type: ignore[attr-defined]
            elif self.kind == "ivfpq":
                params = self._ivf_params(None, self.config.nprobe)
            scores, found = self._knn(self.index, queries[pending], fetch, params, by_id=True)
            short = []
            for row, q in enumerate(pending.tolist()):
                valid = found[row] >= 0
                ids, row_scores = found[row][valid], scores[row][valid]
                kept = keep(ids)
                if kept.sum() >= enough or fetch >= total:
                    out_ids[q], out_scores[q] = ids[kept][:k], row_scores[kept][:k]
                elif fetch >= max(k, MAX_FETCH):
                    out_ids[q], out_scores[q] = exact(q)
                else:
                    short.append(q)
            pending = np.asarray(short, np.int64)
            fetch = min(total, next_fetch(fetch, k))
        return out_ids, out_scores

    def _exact_over(
        self, query: np.ndarray, k: int, bits: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` over the positions set in ``bits``, on the CPU."""
        sel = self.faiss.IDSelectorBitmap(len(bits), self.faiss.swig_ptr(bits))
        host = self.faiss.downcast_index(cast("faiss.IndexIDMap", self._host_index()).index)
        scores, found = self._search_everywhere(query, k, sel, host)
        keep = found >= 0
        return self.positions()[found[keep]], scores[keep]

    def _host_index(self) -> faiss.Index:
        """The index on the CPU: itself, or a GPU index's copy (a loaded index keeps the copy
        it was read from, its size again in host memory; a built one copies itself back on its
        first exact fallback, and again after each change)."""
        if self.config.device != "cuda":
            return self.index
        if self._host is None:
            self._host = self.faiss.index_gpu_to_cpu(self.index)
        return self._host

    def _standing_ids(self, ineligible: frozenset[int]) -> np.ndarray:
        """``ineligible`` and the tombstones as sorted ids (what over-fetching keeps out),
        built again only when they change: a large set costs nothing per query."""
        cached, tombstones = self._standing, len(self._tombstones)
        if cached is None or cached[0][0] is not ineligible or cached[0][1] != tombstones:
            ids = np.asarray(sorted(set(ineligible) | self._tombstones), np.int64)
            cached = ((ineligible, tombstones), ids)
            self._standing = cached
        return cached[1]

    def _clear_standing(self, gone: np.ndarray) -> None:
        """Removed ads' positions cleared in the cached bitmaps (copies: a search in flight
        keeps the one it holds), instead of rebuilding them: that looked up every tombstone
        and ineligible ad again, 0.2 s at 10M ads with 100k tombstones, after each step of an
        update."""
        positions = self.positions()
        live = self._live
        if live is None or live[0] is not positions:
            return
        bits = live[2].copy()
        clear_bits(bits, gone)
        self._live = (positions, len(self._tombstones), bits)
        standing = self._standing_bitmap
        if standing is not None and standing[1] is live[2]:
            kept = standing[2].copy()
            clear_bits(kept, gone)
            self._standing_bitmap = (standing[0], bits, kept)

    def _extend_standing(self, ids: np.ndarray) -> None:
        """The cached bitmaps grown by newly appended positions (live; cleared in the
        standing one where the new ad is ineligible), instead of rebuilt."""
        live = self._live
        positions = self.positions()  # already extended by _append_layout
        if live is None or len(live[0]) + len(ids) != len(positions):
            return
        size = (len(positions) + 7) // 8
        bits = np.concatenate([live[2], np.full(size - len(live[2]), 255, np.uint8)])
        self._live = (positions, live[1], bits)
        standing = self._standing_bitmap
        if standing is not None and standing[1] is live[2]:
            kept = np.concatenate([standing[2], bits[len(standing[2]) :]])
            barred = [i for i, ad in enumerate(ids.tolist()) if ad in standing[0]]
            clear_bits(kept, len(live[0]) + np.asarray(barred, np.int64))
            self._standing_bitmap = (standing[0], bits, kept)

    def _live_bits(self) -> np.ndarray:
        """A bitmap over positions with the removed ads' bits cleared, built again only when
        the positions or the tombstones change."""
        positions, tombstones = self.positions(), len(self._tombstones)
        cached = self._live
        if cached is None or cached[0] is not positions or cached[1] != tombstones:
            bits = np.full((len(positions) + 7) // 8, 255, np.uint8)
            # sorted: binary searches in order read the layout far faster (0.05 vs 0.23 s)
            clear_bits(bits, self.position_of(np.sort(np.fromiter(self._tombstones, np.int64))))
            cached = (positions, tombstones, bits)
            self._live = cached
        return cached[2]

    def _standing_bits(self, ineligible: frozenset[int]) -> np.ndarray:
        """``_live_bits`` with ``ineligible`` cleared too, while the same set and live bits
        stand (the standing ineligible set is one object across requests)."""
        live = self._live_bits()
        cached = self._standing_bitmap
        if cached is None or cached[0] is not ineligible or cached[1] is not live:
            bits = live.copy()
            clear_bits(bits, self.position_of(np.sort(np.fromiter(ineligible, np.int64))))
            cached = (ineligible, live, bits)
            self._standing_bitmap = cached
        return cached[2]

    def _excluded_ids(self, ineligible: frozenset[int], exclude: Iterable[int]) -> np.ndarray:
        """``ineligible``, the tombstones and ``exclude``, sorted."""
        standing = self._standing_ids(ineligible)
        extra = np.asarray(sorted(set(map(int, exclude))), np.int64)
        return np.union1d(standing, extra) if len(extra) else standing

    def _search_everywhere(
        self, query: np.ndarray, k: int, sel: faiss.IDSelector, base: faiss.Index | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of one query over the positions ``sel`` passes, in ``base`` (the
        unwrapped index on the CPU; default this one's): HNSW's flat storage, every IVF cell."""
        base = self._base if base is None else base
        params: faiss.SearchParameters
        index = base
        if self.kind == "hnsw":
            index = self.faiss.downcast_index(cast("faiss.IndexHNSW", base).storage)
            params = self.faiss.SearchParameters(sel=sel)  # type: ignore[call-arg]
        elif self.kind == "ivfpq":
            params = self._ivf_params(sel, self.faiss.extract_index_ivf(base).nlist)
        else:
            params = self.faiss.SearchParameters(sel=sel)  # type: ignore[call-arg]
        scores, found = self._knn(index, query[None], k, params, by_id=False)
        return scores[0], found[0]

    def _knn(
        self,
        index: faiss.Index,
        queries: np.ndarray,
        k: int,
        params: faiss.SearchParameters | None,
        by_id: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``index.search``, re-scored from the refine store where there is one: the best
        ``k * refine_factor`` by the compressed codes, of which the ``k`` best by the stored
        vectors. ``by_id``: ``index`` answers ad ids (the id map; ``params`` then holds no id
        selector: filtered searches go by positions), else positions."""
        if self._refine is None:
            scores, found = index.search(queries, k, params=params)
            return scores, found
        fetch = k * self.config.refine_factor
        if by_id:
            # The unwrapped index answers positions, which the refine store is laid out by
            # (mapping ids back to positions cost more than the search: serving_notes.md, 13).
            _, where = self._base.search(queries, fetch, params=params)
            found = np.where(where >= 0, self.positions()[np.maximum(where, 0)], -1)
        else:
            _, found = index.search(queries, fetch, params=params)
            where = found
        scores = self._refine.scores(queries, where)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(scores, order, axis=1)
        found = np.take_along_axis(found, order, axis=1)
        found[~np.isfinite(scores)] = -1
        return scores, found

    def _params(self, sel: faiss.IDSelector | None) -> faiss.SearchParameters | None:
        # faiss's __init__.pyi has no SearchParametersHNSW and not the keyword constructors that
        # its class_wrappers add at import: those lines carry the ignores.
        params: faiss.SearchParameters | None
        if self.kind == "hnsw":
            params = self.faiss.SearchParametersHNSW(sel=sel, efSearch=self.config.ef_search)  # type: ignore[attr-defined]
        elif self.kind == "ivfpq":
            params = self._ivf_params(sel, self.config.nprobe)
        else:
            params = self.faiss.SearchParameters(sel=sel) if sel is not None else None  # type: ignore[call-arg]
        return params

    def _ivf_params(self, sel: faiss.IDSelector | None, nprobe: int) -> faiss.SearchParameters:
        """IVF's search settings; an HNSW quantizer's beam holds the ``nprobe`` cells."""
        params = self.faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)  # type: ignore[call-arg]
        if self._graph_quantizer is None:  # what the index holds, whatever the config says
            quantizer = self.faiss.downcast_index(self._ivf.quantizer)
            self._graph_quantizer = isinstance(quantizer, self.faiss.IndexHNSW)
        if self._graph_quantizer:
            params.quantizer_params = self.faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
                efSearch=max(64, nprobe)
            )
        return params

    def save(self, path: Path) -> None:
        """Writes the index (CPU form), its tombstones and its refine store."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        index = self.index
        if self.config.device == "cuda":
            index = self.faiss.index_gpu_to_cpu(index)
        self.faiss.write_index(index, str(path))
        arrays: dict[str, Any] = {
            "tombstones": np.asarray(sorted(self._tombstones), np.int64),
            "kind": np.asarray(self.kind),
            **(self._refine.arrays() if self._refine is not None else {}),
        }
        np.savez(ids_file(path), **arrays)

    @classmethod
    def load(cls, path: Path, config: IndexConfig | None = None) -> AdIndex:
        """Reads an index written by ``save`` (onto the GPU if ``config.device`` is cuda)."""
        import faiss

        path = Path(path)
        meta = np.load(ids_file(path))
        stored = faiss.read_index(str(path))
        config = config or IndexConfig()
        obj = cls.__new__(cls)
        obj.faiss, obj.dim, obj.config = faiss, stored.d, config
        obj.kind = str(meta["kind"])
        if config.device == "cuda" and obj.kind != "flat":
            raise ConfigError("kind", f"a cuda index searches exactly (flat); {path} is {obj.kind}")
        obj.index = stored
        # save() wrote an IndexIDMap(2); read_index returns it as its own class
        obj._base = faiss.downcast_index(cast(faiss.IndexIDMap, stored).index)
        obj._host = None
        if config.device == "cuda":
            obj.index = _to_gpu(faiss, stored)
            obj._host = stored  # the CPU copy that an exact fallback searches
        obj._refine = RefineStore.from_arrays(meta) if "refine_kind" in meta.files else None
        obj._tombstones = set(meta["tombstones"].tolist())
        obj._standing = None
        obj._positions = None
        obj._layout = (np.zeros(0, np.int64), SortedIds(np.zeros(0, np.int64)))
        obj._graph_quantizer = None
        obj._live = obj._standing_bitmap = None
        obj.exact_fallbacks = 0
        return obj


class RefineStore:
    """A copy of the vectors by internal position, to re-score an approximate index's
    candidates: sq8 (a byte per dimension over the range trained on a sample), fp16 or flat
    (float32).

    Rows live in blocks: the first sized for the build, each later one for the ads added since
    (at least ``BLOCK_ROWS``), so that an update never copies the store (a grown array would
    hold the old and the new copy at once: 2.25 times the store at 10M ads).

    Args:
        kind: sq8, fp16 or flat.
        dim: vector width.
    """

    DTYPES: ClassVar[dict[str, type[np.generic]]] = {
        "sq8": np.uint8,
        "fp16": np.float16,
        "flat": np.float32,
    }
    BLOCK_ROWS: ClassVar[int] = 65_536

    def __init__(self, kind: str, dim: int) -> None:
        if kind not in self.DTYPES:
            raise ConfigError("refine", f"{kind!r} is not one of {tuple(self.DTYPES)}")
        self.kind, self.dim = kind, dim
        self._blocks: list[np.ndarray] = []  # rows [offset, offset + len(block)) of each
        self._offsets: list[int] = []
        self.size = 0
        self.low = np.zeros(dim, np.float32)
        self.step = np.ones(dim, np.float32)

    def train(self, sample: np.ndarray) -> None:
        """sq8: each dimension's range, from a sample of the vectors."""
        if self.kind == "sq8" and len(sample):
            self.low = sample.min(axis=0).astype(np.float32)
            span = sample.max(axis=0) - self.low
            self.step = np.where(span > 0, span / 255.0, 1.0).astype(np.float32)

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` more vectors, in one block."""
        self._blocks.append(np.zeros((rows, self.dim), self.DTYPES[self.kind]))
        self._offsets.append(self.size)

    def _room(self) -> int:
        return self._offsets[-1] + len(self._blocks[-1]) - self.size if self._blocks else 0

    def add(self, vectors: np.ndarray) -> None:
        """Appends vectors (the next positions)."""
        if self.kind == "sq8":
            vectors = np.clip(np.rint((vectors - self.low) / self.step), 0, 255)
        done = 0
        while done < len(vectors):
            if not self._room():
                self.reserve(max(len(vectors) - done, self.BLOCK_ROWS))
            take = min(self._room(), len(vectors) - done)
            at = self.size - self._offsets[-1]
            self._blocks[-1][at : at + take] = vectors[done : done + take]
            self.size += take
            done += take

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The stored rows at these positions (each >= 0), as stored."""
        if len(self._blocks) == 1:
            only: np.ndarray = self._blocks[0][positions]
            return only
        block = np.searchsorted(self._offsets, positions, side="right") - 1
        out = np.empty((len(positions), self.dim), self.DTYPES[self.kind])
        for b in np.unique(block).tolist():
            mine = block == b
            out[mine] = self._blocks[b][positions[mine] - self._offsets[b]]
        return out

    def scores(self, queries: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Inner products of each query (n, dim) with its rows (n, m) of positions; -inf where
        a position is -1."""
        flat = self.rows(np.maximum(positions, 0).ravel()).astype(np.float32)
        rows = flat.reshape(*positions.shape, self.dim)  # (n, m, dim)
        if self.kind == "sq8":  # q . (low + code * step) = code . (q * step) + q . low
            out = np.einsum("nmd,nd->nm", rows, queries * self.step) + (queries @ self.low)[:, None]
        else:
            out = np.einsum("nmd,nd->nm", rows, queries)
        out[positions < 0] = -np.inf
        result: np.ndarray = out.astype(np.float32)
        return result

    def arrays(self) -> dict[str, np.ndarray]:
        """What ``from_arrays`` reads back (saved beside the index)."""
        used = [
            b[: max(0, min(len(b), self.size - o))]
            for b, o in zip(self._blocks, self._offsets, strict=True)
        ]
        rows = np.concatenate(used) if used else np.zeros((0, self.dim), self.DTYPES[self.kind])
        return {
            "refine_kind": np.asarray(self.kind),
            "refine_rows": rows,
            "refine_low": self.low,
            "refine_step": self.step,
        }

    @classmethod
    def from_arrays(cls, arrays: Any) -> RefineStore:
        rows = np.ascontiguousarray(arrays["refine_rows"])  # an npz reads a key on each access
        store = cls(str(arrays["refine_kind"]), int(rows.shape[1]))
        store._blocks, store._offsets, store.size = [rows], [0], len(rows)
        store.low, store.step = arrays["refine_low"], arrays["refine_step"]
        return store


class VectorFile:
    """A (n, dim) float32 .npy file, read some rows at a time: what a large corpus is built
    from. Plain reads, not a memory map, whose every touched page would count in the reader's
    memory until it is unmapped.

    Args:
        path: the .npy file (``np.save`` of a float32 C-order array).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        with self.path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            self.offset = f.tell()
        if len(shape) != 2 or fortran or dtype != np.dtype("<f4"):
            raise ConfigError(
                "vectors",
                f"{self.path}: expected a 2-D C-order float32 array, got {dtype} "
                f"{shape}{' (Fortran order)' if fortran else ''}",
            )
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows: slice | np.ndarray) -> np.ndarray:
        """The rows of a slice (step 1) or of row numbers (in any order; sorted reads are
        the quickest)."""
        width = self.shape[1] * 4
        with self.path.open("rb") as f:
            if isinstance(rows, slice):
                lo, hi, _ = rows.indices(self.shape[0])
                f.seek(self.offset + lo * width)
                return np.fromfile(f, np.float32, max(hi - lo, 0) * self.shape[1]).reshape(
                    -1, self.shape[1]
                )
            out = np.empty((len(rows), self.shape[1]), np.float32)
            fd = f.fileno()
            if len(rows) < self.shape[0] // 2 and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # scattered rows: no readahead
            for i, row in enumerate(np.asarray(rows, np.int64).tolist()):
                out[i] = np.frombuffer(os.pread(fd, width, self.offset + row * width), np.float32)
            return out


def _rows(vectors: np.ndarray | VectorFile, rows: slice | np.ndarray) -> np.ndarray:
    """Some rows of the vectors as float32 in memory."""
    if isinstance(vectors, VectorFile):
        return vectors.read(rows)
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def _to_gpu(lib: Any, index: faiss.Index) -> faiss.Index:
    """``index``'s copy on GPU 0 (``lib``: the faiss module); refused, naming the field, where
    FAISS sees none."""
    if not hasattr(lib, "index_cpu_to_gpu") or lib.get_num_gpus() < 1:
        raise ConfigError("device", "cuda was asked for but this FAISS build sees no GPU")
    gpu: faiss.Index = lib.index_cpu_to_gpu(lib.StandardGpuResources(), 0, index)
    return gpu


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def not_in(barred: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """ids -> which are not in ``barred`` (sorted ids), by binary search."""

    def keep(ids: np.ndarray) -> np.ndarray:
        if not len(barred):
            return np.ones(len(ids), bool)
        at = np.minimum(np.searchsorted(barred, ids), len(barred) - 1)
        kept: np.ndarray = barred[at] != ids
        return kept

    return keep


def popcount(bits: np.ndarray, n: int) -> int:
    """Set bits among the first ``n`` of a little-endian bitmap."""
    full, rest = divmod(n, 8)
    count = int(_POPCOUNT[bits[:full]].sum())
    if rest:
        count += int(_POPCOUNT[int(bits[full]) & ((1 << rest) - 1)])
    return count


def clear_bits(bits: np.ndarray, positions: np.ndarray) -> None:
    """Clears these positions (-1: none) in a little-endian bitmap, in place."""
    positions = positions[positions >= 0]
    np.bitwise_and.at(bits, positions >> 3, ~(np.uint8(1) << (positions & 7).astype(np.uint8)))


def set_bits(bits: np.ndarray, positions: np.ndarray) -> None:
    """Sets these positions (-1: none) in a little-endian bitmap, in place."""
    positions = positions[positions >= 0]
    np.bitwise_or.at(bits, positions >> 3, np.uint8(1) << (positions & 7).astype(np.uint8))


def ad_rows(
    item_ids: np.ndarray, table: np.ndarray, min_ad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """The (ids, vectors) of a model's item table whose ids are ads (>= ``min_ad_id``)."""
    rows = np.flatnonzero(np.asarray(item_ids) >= min_ad_id)
    return np.asarray(item_ids)[rows], np.asarray(table, dtype=np.float32)[rows]


def exact_search(
    ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int
) -> list[np.ndarray]:
    """Exact inner-product top-``k`` (the reference that recall is measured against)."""
    return AdIndex.build(ids, vectors, IndexConfig(kind="flat")).search(queries, k)[0]


def recall_at_k(approx: list[np.ndarray], exact: list[np.ndarray]) -> float:
    """Mean share of each query's exact top-K that the approximate search also returned."""
    if len(approx) != len(exact):
        raise ValueError(f"{len(approx)} approximate result lists for {len(exact)} exact ones")
    shares = [
        len(np.intersect1d(a, e)) / len(e) for a, e in zip(approx, exact, strict=True) if len(e)
    ]
    return float(np.mean(shares)) if shares else 0.0
