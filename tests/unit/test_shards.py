"""Sharding the ads index by ad id and merging the shards' answers (pure logic; the servers are
in tests/integration/test_ad_shards.py)."""

from __future__ import annotations

import numpy as np
import pytest

from candgen.errors import ConfigError
from candgen.index.ann import AdIndex, IndexConfig, exact_search, recall_at_k
from candgen.serving.shards import ShardedIndex, merge_top_k, shard_of

AD = 1_000_000_000


def test_shards_split_by_id_residue_and_cover_every_ad_once() -> None:
    ids = AD + np.arange(0, 1000, 3, dtype=np.int64)  # gaps: every third id
    which = shard_of(ids, 4)
    assert sorted(np.concatenate([ids[which == s] for s in range(4)]).tolist()) == ids.tolist()
    assert (ids[which == 1] % 4 == 1).all()
    assert {int((which == s).sum()) for s in range(4)} <= {83, 84}
    with pytest.raises(ConfigError, match=r"^shards: must be >= 1"):
        shard_of(ids, 0)


def test_the_merge_keeps_the_best_k_best_first_and_breaks_ties_by_id() -> None:
    a = (np.array([5, 3, 9]), np.array([0.9, 0.5, 0.1], np.float32))
    b = (np.array([4, 2]), np.array([0.5, 0.7], np.float32))
    ids, scores = merge_top_k([a, b], 4)
    assert ids.tolist() == [5, 2, 3, 4] and scores.tolist() == pytest.approx([0.9, 0.7, 0.5, 0.5])
    assert merge_top_k([b, a], 4)[0].tolist() == [5, 2, 3, 4]  # whichever shard answers first
    assert merge_top_k([a, (np.zeros(0, np.int64), np.zeros(0, np.float32))], 10)[0].tolist() == [
        5,
        3,
        9,
    ]


def test_compressed_shards_keep_their_recall_through_the_merge() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 32)).astype(np.float32)
    vecs = centres[rng.integers(0, 40, 8000)] + 0.5 * rng.standard_normal((8000, 32)).astype(
        np.float32
    )
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = AD + np.arange(8000, dtype=np.int64)
    config = IndexConfig(kind="ivfpq", pq_m=8, ivf_nlist=32, nprobe=16, refine="sq8")
    which = shard_of(ids, 2)
    parts = [AdIndex.build(ids[which == s], vecs[which == s], config) for s in range(2)]
    queries = vecs[:30] + 0.2 * rng.standard_normal((30, 32)).astype(np.float32)
    merged = []
    for q in queries:
        answers = []
        for part in parts:
            found, scores = part.search(q[None], 50)
            answers.append((found[0], scores[0]))
        merged.append(merge_top_k(answers, 50)[0])
    assert recall_at_k(merged, exact_search(ids, vecs, queries, 50)) >= 0.95


@pytest.mark.parametrize(
    ("urls", "timeout", "message"),
    [([], 1.0, "^ad_shard_urls: needs at least one"), (["h:1"], 0.0, "^ad_shard_timeout_s")],
)
def test_a_sharded_index_without_shards_or_time_is_refused(
    urls: list[str], timeout: float, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        ShardedIndex(urls, timeout)


def test_a_shard_gets_no_dynamic_batcher_whatever_the_in_flight_limit() -> None:
    from candgen.endpoint.export import step_config
    from candgen.serving.steps import ServingConfig, ShardStep

    for limit in (0, 4):
        config = step_config(ShardStep, ServingConfig(max_inflight=limit))
        assert 'name: "candgen_ad_shard"' in config and "dynamic_batching" not in config
