"""The FAISS ad index: exact vs approximate recall, query-time eligibility, in-place updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from candgen.errors import ConfigError
from candgen.index.ann import (
    MAX_FETCH,
    AdIndex,
    IndexConfig,
    VectorFile,
    exact_search,
    recall_at_k,
)

AD = 1_000_000_000


def _corpus(n: int = 3000, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return AD + np.arange(1, n + 1, dtype=np.int64), vectors


def test_flat_search_is_exact_inner_product() -> None:
    ids, vecs = _corpus(500)
    q = vecs[:4] + 0.05
    found, scores = AdIndex.build(ids, vecs, IndexConfig(kind="flat")).search(q, 10)
    expected = np.argsort(-(q @ vecs.T), axis=1)[:, :10]
    for row in range(4):
        assert found[row].tolist() == ids[expected[row]].tolist()
        assert np.allclose(scores[row], (q @ vecs.T)[row, expected[row]], atol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_recall_against_exact(kind: str) -> None:  # IVF-PQ re-scored by default
    ids, vecs = _corpus(3000)
    rng = np.random.default_rng(1)
    queries = vecs[rng.choice(len(vecs), 50, replace=False)] + 0.1 * rng.standard_normal(
        (50, vecs.shape[1])
    ).astype(np.float32)
    exact = exact_search(ids, vecs, queries, 100)
    approx = AdIndex.build(ids, vecs, IndexConfig(kind=kind, pq_m=8, nprobe=64)).search(
        queries, 100
    )[0]
    recall = recall_at_k(approx, exact)
    # IVF-PQ compresses vectors (8 bytes each here), so it trades recall for memory.
    assert recall >= (0.95 if kind == "hnsw" else 0.6), recall
    assert recall <= 1.0


def test_auto_picks_exact_for_small_corpora_and_hnsw_beyond() -> None:
    assert IndexConfig().resolved_kind(10_000) == "flat"
    assert IndexConfig(exact_max=1000).resolved_kind(10_000) == "hnsw"


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_ineligible_ads_are_excluded_at_query_time(kind: str) -> None:
    ids, vecs = _corpus(400)
    index = AdIndex.build(ids, vecs, IndexConfig(kind=kind))
    q = vecs[:1]
    top = index.search(q, 5)[0][0]
    assert top[0] == ids[0]
    paused = top[:2].tolist()
    again = index.search(q, 5, exclude=paused)[0][0]
    assert not set(paused) & set(again.tolist()) and len(again) == 5
    assert len(index) == 400  # nothing was rebuilt or removed


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_standing_ineligible_set_combines_with_per_request_exclusions(kind: str) -> None:
    ids, vecs = _corpus(400)
    index = AdIndex.build(ids, vecs, IndexConfig(kind=kind))
    q = vecs[:1]
    top = index.search(q, 6)[0][0].tolist()
    paused = frozenset(top[:2])
    got = index.search(q, 6, exclude=[top[2]], ineligible=paused)[0][0].tolist()
    assert not (set(top[:3]) & set(got)) and len(got) == 6
    # The same set object again (its selector reused), then a changed one (rebuilt).
    assert index.search(q, 6, ineligible=paused)[0][0].tolist()[:4] == top[2:6]
    resumed = frozenset({top[0]})
    assert index.search(q, 6, ineligible=resumed)[0][0].tolist()[:5] == top[1:6]
    # A removal after the selector was built is still honoured.
    index.remove([top[3]])
    assert top[3] not in index.search(q, 6, ineligible=resumed)[0][0].tolist()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_new_ads_are_retrievable_at_once_and_removed_ads_never(kind: str) -> None:
    ids, vecs = _corpus(2000)
    index = AdIndex.build(ids, vecs, IndexConfig(kind=kind, pq_m=8, nprobe=256))
    new_vec = np.random.default_rng(7).standard_normal((1, vecs.shape[1])).astype(np.float32)
    new_vec /= np.linalg.norm(new_vec)
    new_id = AD + 999_999
    index.add([new_id], new_vec)
    assert new_id in index and len(index) == 2001
    assert index.search(new_vec, 1)[0][0].tolist() == [new_id]

    assert index.remove([new_id, AD + 1]) == 2
    assert len(index) == 1999
    found = index.search(np.vstack([new_vec, vecs[:1]]), 20)[0]
    assert not {new_id, AD + 1} & set(np.concatenate(found).tolist())


def test_fewer_ads_than_k_gives_fewer_results_never_padding() -> None:
    ids, vecs = _corpus(5)
    index = AdIndex.build(ids, vecs, IndexConfig(kind="flat"))
    found, scores = index.search(vecs[:2], 100, exclude=[ids[0]])
    assert [len(f) for f in found] == [4, 4]
    assert all((f >= 0).all() for f in found) and len(scores[0]) == 4


def test_save_and_load_keep_ids_and_tombstones(tmp_path: Path) -> None:
    ids, vecs = _corpus(300)
    index = AdIndex.build(ids, vecs, IndexConfig(kind="hnsw"))
    index.remove([ids[0]])
    index.save(tmp_path / "ads.faiss")
    loaded = AdIndex.load(tmp_path / "ads.faiss")
    assert loaded.kind == "hnsw" and len(loaded) == 299
    assert ids[0] not in loaded.search(vecs[:1], 5)[0][0].tolist()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda i: i.search(np.zeros((1, 32), np.float32), 0), "k: must be > 0"),
        (lambda i: i.search(np.zeros((1, 8), np.float32), 5), r"queries: expected shape \(n, 32\)"),
        (lambda i: i.add([1, 1], np.zeros((2, 32))), "ids: ids repeat"),
        (lambda i: i.add([-5], np.zeros((1, 32))), "ids: ids must be >= 0"),
        (lambda i: i.add([7], np.full((1, 32), np.nan)), "vectors: vectors hold NaN"),
    ],
)
def test_bad_input_names_the_field(call, message: str) -> None:  # type: ignore[no-untyped-def]
    ids, vecs = _corpus(50)
    with pytest.raises(ConfigError, match=message):
        call(AdIndex.build(ids, vecs, IndexConfig(kind="flat")))


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ConfigError, match="kind: 'annoy' is not one of"):
        IndexConfig(kind="annoy")
    with pytest.raises(ConfigError, match="pq_m: 5 does not divide dim 32"):
        AdIndex(32, IndexConfig(kind="ivfpq", pq_m=5), expected_size=100)


def _bitmap(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask, bitorder="little")


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_a_request_bitmap_keeps_every_answer_inside_it(kind: str) -> None:
    ids, vecs = _corpus(3000)
    index = AdIndex.build(ids, vecs, IndexConfig(kind=kind, pq_m=8, nprobe=64))
    rng = np.random.default_rng(3)
    queries = vecs[:20] + 0.1 * rng.standard_normal((20, vecs.shape[1])).astype(np.float32)
    positions = index.positions()
    assert sorted(positions.tolist()) == ids.tolist()
    mask = rng.random(len(positions)) < 0.4  # 60% ineligible
    history = [int(positions[np.flatnonzero(mask)[0]])]
    found, _ = index.search(queries, 100, exclude=history, allowed=_bitmap(mask))
    allowed_ids = set(positions[mask].tolist()) - set(history)
    for row in found:
        assert len(row) == 100 and set(row.tolist()) <= allowed_ids
    if kind != "ivfpq":
        keep = np.flatnonzero(np.isin(ids, list(allowed_ids)))
        exact = exact_search(ids[keep], vecs[keep], queries, 100)
        assert recall_at_k(found, exact) >= (1.0 if kind == "flat" else 0.95)


def test_hnsw_answers_exactly_where_the_filter_empties_its_beam() -> None:
    # The allowed ads lie opposite the query: HNSW's beam around the query finds none of them.
    ids, vecs = _corpus(3000)
    index = AdIndex.build(ids, vecs, IndexConfig(kind="hnsw", ef_search=16))
    query = vecs[:1]
    positions = index.positions()
    by_pos = vecs[np.searchsorted(ids, positions)]
    scores = by_pos @ query[0]
    mask = scores <= np.sort(scores)[29]  # the 30 ads least like the query
    assert mask.sum() == 30
    found, _ = index.search(query, 10, allowed=_bitmap(mask))
    exact = exact_search(positions[mask], by_pos[mask], query, 10)
    assert found[0].tolist() == exact[0].tolist()
    assert index.exact_fallbacks >= 1
    # fewer allowed than K: all of them, never padding
    few = np.zeros(len(positions), bool)
    few[:3] = True
    assert sorted(index.search(query, 10, allowed=_bitmap(few))[0][0].tolist()) == sorted(
        positions[:3].tolist()
    )


def test_ivf_answers_over_every_cell_where_the_probed_ones_hold_too_few() -> None:
    ids, vecs = _corpus(3000)
    index = AdIndex.build(ids, vecs, IndexConfig(kind="ivfpq", pq_m=8, ivf_nlist=64, nprobe=1))
    query = vecs[:1]
    positions = index.positions()
    scores = vecs[np.searchsorted(ids, positions)] @ query[0]
    mask = scores <= np.sort(scores)[29]  # 30 ads far from the query: outside its probed cell
    found, _ = index.search(query, 20, allowed=_bitmap(mask))
    assert len(found[0]) == 20 and set(found[0].tolist()) <= set(positions[mask].tolist())
    assert index.exact_fallbacks >= 1


def test_positions_follow_removals_and_a_short_bitmap_is_refused() -> None:
    ids, vecs = _corpus(50)
    flat = AdIndex.build(ids, vecs, IndexConfig(kind="flat"))
    flat.remove([int(ids[0])])
    assert int(ids[0]) not in flat.positions().tolist() and len(flat.positions()) == 49
    assert flat.position_of(np.array([ids[0], ids[1]])).tolist()[0] == -1
    with pytest.raises(ConfigError, match=r"^allowed: must be a uint8 bitmap of 49 bits"):
        flat.search(vecs[:1], 5, allowed=np.zeros(2, np.uint8))
    with pytest.raises(ConfigError, match=r"^allowed: must be a uint8 bitmap"):
        flat.search(vecs[:1], 5, allowed=np.ones(49, bool))  # unpacked: refused, not misread
    hnsw = AdIndex.build(ids, vecs, IndexConfig(kind="hnsw"))
    hnsw.remove([int(ids[0])])  # HNSW keeps the position; the tombstone keeps it out
    everyone = _bitmap(np.ones(len(hnsw.positions()), bool))
    assert int(ids[0]) not in hnsw.search(vecs[:1], 50, allowed=everyone)[0][0].tolist()


# Over-fetch and keep the allowed: what a GPU index does (FAISS's GPU indexes take no selector),
# run here on the CPU, where the selector's answers are the reference.
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_overfetch_answers_what_the_selector_answers(kind: str) -> None:
    ids, vecs = _corpus(3000)
    config = IndexConfig(kind=kind, ef_search=128)
    by_selector = AdIndex.build(ids, vecs, config)
    by_overfetch = AdIndex.build(ids, vecs, IndexConfig(kind=kind, ef_search=128,
                                                        filter_mode="overfetch"))  # fmt: skip
    assert by_overfetch.config.overfetch and not by_selector.config.overfetch
    rng = np.random.default_rng(5)
    queries = vecs[:20] + 0.1 * rng.standard_normal((20, vecs.shape[1])).astype(np.float32)
    positions = by_selector.positions()
    assert by_overfetch.positions().tolist() == positions.tolist()
    mask = rng.random(len(positions)) < 0.3
    history = [int(positions[np.flatnonzero(mask)[0]])]
    ineligible = frozenset(positions[~mask].tolist())
    allowed_ids = set(positions[mask].tolist()) - set(history)
    keep = np.flatnonzero(np.isin(ids, list(allowed_ids)))
    exact = exact_search(ids[keep], vecs[keep], queries, 50)
    for index in (by_selector, by_overfetch):
        bitmap_found, _ = index.search(queries, 50, exclude=history, allowed=_bitmap(mask))
        set_found, _ = index.search(queries, 50, exclude=history, ineligible=ineligible)
        for found in (bitmap_found, set_found):
            for row in found:
                assert len(row) == 50 and set(row.tolist()) <= allowed_ids
            assert recall_at_k(found, exact) >= (1.0 if kind == "flat" else 0.95)
    if kind == "flat":  # both exact: the same ads, in the same order
        a = by_selector.search(queries, 50, exclude=history, allowed=_bitmap(mask))[0]
        b = by_overfetch.search(queries, 50, exclude=history, allowed=_bitmap(mask))[0]
        assert [r.tolist() for r in a] == [r.tolist() for r in b]
    assert by_overfetch.exact_fallbacks == 0  # 30% allowed: the first fetch of 4 K sufficed


def test_overfetch_answers_exactly_where_the_allowed_ads_lie_past_its_reach() -> None:
    ids, vecs = _corpus(3000)
    index = AdIndex.build(ids, vecs, IndexConfig(kind="flat", filter_mode="overfetch"))
    query = vecs[:1]
    positions = index.positions()
    by_pos = vecs[np.searchsorted(ids, positions)]
    scores = by_pos @ query[0]
    mask = scores <= np.sort(scores)[29]  # the 30 ads least like the query: past 2048 fetched
    found, _ = index.search(query, 10, allowed=_bitmap(mask))
    assert found[0].tolist() == exact_search(positions[mask], by_pos[mask], query, 10)[0].tolist()
    assert index.exact_fallbacks == 1
    ineligible = frozenset(positions[~mask].tolist())
    assert index.search(query, 10, ineligible=ineligible)[0][0].tolist() == found[0].tolist()
    few = np.zeros(len(positions), bool)
    few[:3] = True  # fewer allowed than K: all of them, never padding
    assert sorted(index.search(query, 10, allowed=_bitmap(few))[0][0].tolist()) == sorted(
        positions[:3].tolist()
    )
    index.remove([int(positions[0])])  # a removed ad is never answered, the fallback's too
    assert sorted(index.search(query, 10, allowed=_bitmap(few[1:]))[0][0].tolist()) == sorted(
        positions[1:3].tolist()
    )


def test_a_gpu_index_is_refused_naming_the_field_where_faiss_sees_no_gpu(tmp_path: Path) -> None:
    import faiss

    if hasattr(faiss, "index_cpu_to_gpu") and faiss.get_num_gpus() > 0:
        pytest.skip("this machine has a GPU: test_a_gpu_like_index_* covers the cuda path")
    ids, vecs = _corpus(50)
    with pytest.raises(ConfigError, match=r"^device: cuda was asked for but this FAISS build"):
        AdIndex.build(ids, vecs, IndexConfig(device="cuda"))
    AdIndex.build(ids, vecs, IndexConfig(kind="flat")).save(tmp_path / "ads.faiss")
    with pytest.raises(ConfigError, match=r"^device: cuda was asked for but this FAISS build"):
        AdIndex.load(tmp_path / "ads.faiss", IndexConfig(device="cuda"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"filter_mode": "bitset"}, r"^filter_mode: 'bitset' is not one of"),
    ({"device": "cuda", "filter_mode": "selector"}, r"^filter_mode: FAISS's GPU indexes take no"),
    ({"device": "cuda", "kind": "hnsw"}, r"^kind: a cuda index searches exactly"),
])  # fmt: skip
def test_a_filter_mode_the_device_cannot_serve_is_refused(
    kwargs: dict[str, str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        IndexConfig(**kwargs)
    assert IndexConfig(device="cuda").overfetch and not IndexConfig().overfetch
    ids, vecs = _corpus(50)
    AdIndex.build(ids, vecs, IndexConfig(kind="hnsw")).save(tmp_path / "ads.faiss")
    with pytest.raises(ConfigError, match=r"^kind: a cuda index searches exactly \(flat\); "):
        AdIndex.load(tmp_path / "ads.faiss", IndexConfig(device="cuda"))


class _GpuLike:
    """FAISS's GPU search contract on a CPU index: no ID selector, K at most ``MAX_FETCH``,
    no removal."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def search(self, x, k, params=None):  # type: ignore[no-untyped-def]
        assert params is None or params.sel is None, "a GPU index takes no selector"
        assert k <= MAX_FETCH, f"a GPU index selects at most {MAX_FETCH}, asked {k}"
        return self.inner.search(x, k, params=params)  # type: ignore[attr-defined]

    def remove_ids(self, sel: object) -> None:
        raise AssertionError("a GPU index implements no removal")

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def _gpu_like(ids: np.ndarray, vecs: np.ndarray) -> tuple[AdIndex, AdIndex]:
    """A flat index that searches as a GPU one must (``_GpuLike``), over its own CPU copy, and
    a plain CPU one beside it: the reference."""
    index = AdIndex.build(ids, vecs, IndexConfig(kind="flat"))
    host = index.index
    index.config = IndexConfig(device="cuda")
    index.index = _GpuLike(host)  # type: ignore[assignment]
    index._host_index = lambda: host  # type: ignore[method-assign]
    return index, AdIndex.build(ids, vecs, IndexConfig(kind="flat"))


def test_a_gpu_like_index_answers_what_the_cpu_selector_answers() -> None:
    ids, vecs = _corpus(3000)
    gpu, cpu = _gpu_like(ids, vecs)
    rng = np.random.default_rng(7)
    queries = vecs[:8] + 0.1 * rng.standard_normal((8, vecs.shape[1])).astype(np.float32)
    positions = cpu.positions()
    mask = rng.random(len(positions)) < 0.3
    history = [int(positions[np.flatnonzero(mask)[0]])]
    ineligible = frozenset(positions[~mask].tolist())

    def same(**kwargs: object) -> None:
        got = gpu.search(queries, **kwargs)[0]  # type: ignore[arg-type]
        want = cpu.search(queries, **kwargs)[0]  # type: ignore[arg-type]
        assert [r.tolist() for r in got] == [r.tolist() for r in want]

    for k in (50, 2_500):  # 2,500: past the GPU's K, answered exactly on the CPU copy
        same(k=k, exclude=history, allowed=_bitmap(mask))
        same(k=k, exclude=history, ineligible=ineligible)
    same(k=2_500)
    # A removal on a GPU index is a tombstone, kept out even under the same ineligible set.
    gone = int(gpu.search(queries[:1], 1, ineligible=ineligible)[0][0][0])
    gpu.remove([gone])
    cpu.remove([gone])
    same(k=50, ineligible=ineligible)
    # The CPU index compacted its positions, the GPU one kept them: each its own bitmap.
    allowed_ids = positions[mask]
    got = gpu.search(queries, 50, allowed=_bitmap(np.isin(gpu.positions(), allowed_ids)))[0]
    want = cpu.search(queries, 50, allowed=_bitmap(np.isin(cpu.positions(), allowed_ids)))[0]
    assert len(gpu.positions()) == len(cpu.positions()) + 1
    assert [r.tolist() for r in got] == [r.tolist() for r in want]
    assert gone not in gpu.search(queries[:1], 50, ineligible=ineligible)[0][0].tolist()
    with pytest.raises(ConfigError, match=r"^ids: a flat index on the cuda cannot replace ads"):
        gpu.add([int(ids[1])], vecs[1:2])


# -- compressed indexes (IVF-PQ re-scored from a copy of the vectors) --------------------------


def _clustered(n: int, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids, vectors and queries from a mixture of clusters (PQ's codes fit it as they would a
    model's embeddings; uniform noise would leave every index far from exact)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim)).astype(np.float32)
    vecs = centres[rng.integers(0, 50, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    qs = centres[rng.integers(0, 50, 40)] + 0.5 * rng.standard_normal((40, dim)).astype(np.float32)
    return AD + np.arange(1, n + 1, dtype=np.int64), vecs, qs / np.linalg.norm(qs, axis=1)[:, None]


@pytest.mark.parametrize(
    ("n", "extra"),
    [
        (4000, {"refine": "sq8"}),
        (4000, {"refine": "fp16"}),
        (4000, {"refine": "flat"}),
        (4000, {"refine": "sq8", "ivf_quantizer": "hnsw"}),
        (2000, {"refine": "sq8", "opq": True}),
    ],
)
def test_refine_recovers_the_recall_that_pq_codes_lose(n: int, extra: dict) -> None:
    ids, vecs, qs = _clustered(n)
    exact = exact_search(ids, vecs, qs, 50)
    base = {"kind": "ivfpq", "pq_m": 4, "ivf_nlist": 16, "nprobe": 16, "refine": "none"}
    codes_only = recall_at_k(AdIndex.build(ids, vecs, IndexConfig(**base)).search(qs, 50)[0], exact)
    refined_index = AdIndex.build(ids, vecs, IndexConfig(**{**base, **extra}))
    found, scores = refined_index.search(qs, 50)
    refined = recall_at_k(found, exact)
    assert refined >= 0.97 and refined - codes_only >= 0.05, (codes_only, refined)
    if extra["refine"] == "flat":  # the scores are the vectors' own inner products
        by_id = dict(zip(ids.tolist(), vecs, strict=True))
        for q, row, row_scores in zip(qs, found, scores, strict=True):
            assert np.allclose(row_scores, [by_id[i] @ q for i in row.tolist()], atol=1e-5)
            assert (np.diff(row_scores) <= 1e-6).all()  # best first


@pytest.mark.parametrize("filter_mode", ["selector", "overfetch"])
def test_a_refined_index_keeps_to_eligibility(filter_mode: str) -> None:
    ids, vecs, qs = _clustered(4000)
    index = AdIndex.build(
        ids,
        vecs,
        IndexConfig(
            kind="ivfpq", pq_m=4, ivf_nlist=16, nprobe=16, refine="flat", filter_mode=filter_mode
        ),
    )
    positions = index.positions()
    mask = np.random.default_rng(2).random(len(positions)) < 0.3
    history = [int(positions[np.flatnonzero(mask)[0]])]
    allowed_ids = set(positions[mask].tolist()) - set(history)
    keep = np.flatnonzero(np.isin(ids, list(allowed_ids)))
    exact = exact_search(ids[keep], vecs[keep], qs, 50)
    ineligible = frozenset(positions[~mask].tolist())
    by_bitmap = index.search(qs, 50, exclude=history, allowed=_bitmap(mask))[0]
    by_set = index.search(qs, 50, exclude=history, ineligible=ineligible)[0]
    for found in (by_bitmap, by_set):
        assert all(len(row) == 50 and set(row.tolist()) <= allowed_ids for row in found)
        assert recall_at_k(found, exact) >= 0.95


def test_the_ivf_fallback_over_every_cell_is_refined_too() -> None:
    ids, vecs, _ = _clustered(3000)
    config = IndexConfig(kind="ivfpq", pq_m=4, ivf_nlist=64, nprobe=1, refine="flat")
    index = AdIndex.build(ids, vecs, config)
    query = vecs[:1]
    positions = index.positions()
    by_pos = vecs[np.searchsorted(ids, positions)]
    scores = by_pos @ query[0]
    mask = scores <= np.sort(scores)[29]  # 30 ads far from the query: outside its probed cell
    found, found_scores = index.search(query, 10, allowed=_bitmap(mask))
    assert found[0].tolist() == exact_search(positions[mask], by_pos[mask], query, 10)[0].tolist()
    assert np.allclose(found_scores[0], np.sort(scores[mask])[::-1][:10], atol=1e-5)
    assert index.exact_fallbacks == 1


def test_a_compressed_index_answers_the_same_after_save_and_load(tmp_path: Path) -> None:
    ids, vecs, qs = _clustered(4000)
    config = IndexConfig(kind="ivfpq", pq_m=8, ivf_quantizer="hnsw", refine="sq8")
    index = AdIndex.build(ids, vecs, config)
    index.remove([int(ids[0]), int(ids[1])])
    index.save(tmp_path / "ads.faiss")
    loaded = AdIndex.load(tmp_path / "ads.faiss", config)
    assert loaded.kind == "ivfpq" and len(loaded) == len(index) == 3998
    assert loaded._refine is not None and loaded._refine.kind == "sq8"
    for before, after in zip(index.search(qs, 30)[0], loaded.search(qs, 30)[0], strict=True):
        assert before.tolist() == after.tolist()
    assert not {int(ids[0]), int(ids[1])} & set(np.concatenate(loaded.search(vecs[:2], 30)[0]))


def test_ads_added_after_a_build_are_refined_and_positioned_like_the_rest() -> None:
    ids, vecs, _ = _clustered(3000)
    config = IndexConfig(kind="ivfpq", pq_m=4, ivf_nlist=16, nprobe=16, refine="flat")
    index = AdIndex.build(ids[:2000], vecs[:2000], config)
    index.position_of(ids[:1])  # the layout is cached, then extended by each add
    for lo in (2000, 2500):
        index.add(ids[lo : lo + 500][::-1], vecs[lo : lo + 500][::-1])
    cached = (index.positions().copy(), index.position_of(ids).copy())
    index._positions = None  # recomputed from FAISS's id map
    assert index.positions().tolist() == cached[0].tolist()
    assert index.position_of(ids).tolist() == cached[1].tolist()
    found, scores = index.search(vecs[2999:3000], 1)
    assert found[0].tolist() == [ids[2999]] and np.isclose(scores[0][0], 1.0, atol=1e-5)
    assert len(index) == 3000 and ids[2500] in index and AD not in index


class _CountingFile(VectorFile):
    """A VectorFile that records how many rows each read asked for."""

    reads: list[int]

    def read(self, rows: slice | np.ndarray) -> np.ndarray:
        out = super().read(rows)
        self.reads = [*getattr(self, "reads", []), len(out)]
        return out


def test_a_large_corpus_is_built_from_a_file_a_chunk_at_a_time(tmp_path: Path) -> None:
    ids, vecs, qs = _clustered(5000)
    np.save(tmp_path / "vectors.npy", vecs)
    source = _CountingFile(tmp_path / "vectors.npy")
    assert len(source) == 5000 and source.shape == (5000, 32)
    config = IndexConfig(
        kind="ivfpq", pq_m=4, ivf_nlist=16, refine="sq8", train_size=1500, build_chunk=700
    )
    from_file = AdIndex.build(ids, source, config, progress=True)
    in_memory = AdIndex.build(ids, vecs, config)
    assert source.reads[0] == 1500 and max(source.reads[1:]) == 700 and sum(source.reads) == 6500
    for a, b in zip(from_file.search(qs, 20)[0], in_memory.search(qs, 20)[0], strict=True):
        assert a.tolist() == b.tolist()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"refine": "sq4"}, "^refine: 'sq4' is not one of"),
        ({"ivf_quantizer": "ivf"}, "^ivf_quantizer: 'ivf' is not one of"),
        ({"refine_factor": 0}, "^refine_factor: must be an integer >= 1"),
        ({"build_chunk": 0}, "^build_chunk: must be an integer >= 1"),
        ({"train_size": -1}, "^train_size: must be an integer >= 0"),
        ({"nprobe": 2.5}, "^nprobe: must be an integer >= 1"),
        ({"refine_factor": True}, "^refine_factor: must be an integer >= 1"),
        ({"opq": "no"}, "^opq: must be true or false"),
    ],
)
def test_bad_compressed_index_settings_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        IndexConfig(**fields)


def test_too_few_training_vectors_for_the_cells_and_a_bad_file_are_refused(tmp_path: Path) -> None:
    ids, vecs, _ = _clustered(500)
    with pytest.raises(ConfigError, match=r"^ivf_nlist: 256 cells need at least as many"):
        AdIndex.build(ids, vecs, IndexConfig(kind="ivfpq", pq_m=4, ivf_nlist=256, train_size=200))
    np.save(tmp_path / "wide.npy", vecs.astype(np.float64))
    with pytest.raises(ConfigError, match=r"^vectors: .*wide\.npy: expected a 2-D C-order float32"):
        VectorFile(tmp_path / "wide.npy")
    with pytest.raises(ConfigError, match=r"^ids: 499 ids for 500 vectors"):
        AdIndex.build(ids[:-1], vecs, IndexConfig(kind="flat"))


def test_ads_added_after_a_load_go_to_a_block_of_their_own_and_score_alike(tmp_path: Path) -> None:
    ids, vecs, qs = _clustered(3000)
    config = IndexConfig(kind="ivfpq", pq_m=4, ivf_nlist=16, nprobe=16, refine="sq8")
    AdIndex.build(ids[:2000], vecs[:2000], config).save(tmp_path / "ads.faiss")
    loaded = AdIndex.load(tmp_path / "ads.faiss", config)
    store = loaded._refine
    assert store is not None
    first = store._blocks[0]
    loaded.add(ids[2000:], vecs[2000:])
    assert store._blocks[0] is first and len(store._blocks) == 2  # appended, nothing copied
    by_id = dict(zip(ids.tolist(), vecs, strict=True))
    found, scores = loaded.search(np.vstack([qs, vecs[2990:]]), 20)
    for q, row, row_scores in zip(np.vstack([qs, vecs[2990:]]), found, scores, strict=True):
        # re-scored from either block: within sq8's rounding of the exact inner product
        assert np.allclose(row_scores, [by_id[i] @ q for i in row.tolist()], atol=0.02)
    assert all(int(i) in f.tolist() for i, f in zip(ids[2990:], found[len(qs) :], strict=True))


def test_over_fetching_asks_four_times_more_each_time_up_to_the_cap() -> None:
    from candgen.index.ann import next_fetch

    fetches = [next_fetch(0, 100)]
    while fetches[-1] < MAX_FETCH:
        fetches.append(next_fetch(fetches[-1], 100))
    assert fetches == [400, 1600, 2048]
    assert next_fetch(0, 3000) == 3000  # never fewer than k


def test_a_training_sample_larger_than_the_corpus_takes_the_corpus() -> None:
    ids, vecs, qs = _clustered(600)
    index = AdIndex.build(ids, vecs, IndexConfig(kind="ivfpq", pq_m=4, ivf_nlist=8,
                                                 train_size=1_000_000))  # fmt: skip
    assert len(index) == 600 and len(index.search(qs[:1], 10)[0][0]) == 10


def test_ids_repeated_across_build_chunks_are_refused() -> None:
    ids, vecs, _ = _clustered(600)
    ids[500] = ids[10]  # chunks of 200: a repeat no single add would see
    with pytest.raises(ConfigError, match=r"^ids: ids repeat"):
        AdIndex.build(ids, vecs, IndexConfig(kind="flat", build_chunk=200))


def test_the_cached_bitmaps_follow_adds_and_removals_as_a_rebuild_would() -> None:
    ids, vecs, qs = _clustered(3000)
    config = IndexConfig(kind="ivfpq", pq_m=4, ivf_nlist=16, nprobe=16)
    index = AdIndex.build(ids[:2000], vecs[:2000], config)
    ineligible = frozenset(ids[[5, 2500, 2999]].tolist())  # two of them not added yet
    steps = [
        lambda: index.remove(ids[10:20].tolist()),
        lambda: index.add(ids[2000:2500], vecs[2000:2500]),
        lambda: index.remove([int(ids[2100])]),
        lambda: index.add(ids[2500:], vecs[2500:]),
    ]
    for step in steps:
        index.search(qs[:1], 10, ineligible=ineligible)  # the caches exist before each change
        step()
    live, standing = index._live_bits(), index._standing_bits(ineligible)
    index._live = index._standing_bitmap = None  # rebuilt from the tombstones and the set
    assert (index._live_bits() == live).all()
    assert (index._standing_bits(ineligible) == standing).all()
    found = index.search(vecs[[2500, 2999, 15, 2100, 2600]], 20, ineligible=ineligible)[0]
    barred = {*ineligible, *ids[10:20].tolist(), int(ids[2100])}
    assert not barred & set(np.concatenate(found).tolist())
    assert int(ids[2600]) in found[4].tolist()


def test_a_plain_search_keeps_to_the_probed_cells_and_an_eligibility_search_does_not() -> None:
    ids, vecs, _ = _clustered(3000)
    index = AdIndex.build(ids, vecs, IndexConfig(kind="ivfpq", pq_m=4, ivf_nlist=64, nprobe=1))
    plain = index.search(vecs[:5], 100)[0]  # one cell of about 47 ads: short, no full scan
    assert all(len(row) < 100 for row in plain) and index.exact_fallbacks == 0
    everyone = np.full((len(index.positions()) + 7) // 8, 255, np.uint8)
    assert all(len(row) == 100 for row in index.search(vecs[:5], 100, allowed=everyone)[0])
    assert index.exact_fallbacks == 5
