"""The ads index in 2 shards, each in its own real tritonserver, merged into one answer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from candgen.endpoint.export import export_shards
from candgen.endpoint.runtime import ServerConfig, start, stop
from candgen.errors import CandgenError
from candgen.index.ann import MAX_FETCH, AdIndex, IndexConfig, exact_search, not_in
from candgen.serving.shards import ShardedIndex, shard_of
from candgen.serving.steps import ServingConfig
from tests.net import free_ports

pytestmark = pytest.mark.integration

AD = 1_000_000_000


@dataclass
class Shards:
    ids: np.ndarray
    vectors: np.ndarray
    ineligible: np.ndarray
    urls: list[str]
    servers: list[ServerConfig]
    updates: Path


def _corpus(n: int = 6000, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, dim)).astype(np.float32)
    vecs = centres[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    # Ids with gaps, as real ads have: id % 2 still splits them about evenly.
    ids = AD + np.sort(rng.choice(10 * n, n, replace=False)).astype(np.int64)
    return ids, vecs


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shards]:
    tmp = tmp_path_factory.mktemp("shards")
    ids, vecs = _corpus()
    ineligible = ids[::97]
    summary = export_shards(
        ids,
        vecs,
        2,
        tmp / "repos",
        IndexConfig(kind="flat"),
        ServingConfig(max_inflight=0, ad_updates_dir=str(tmp / "updates"), ad_updates_poll_s=0.2),
        {"test": "shards"},
    )
    repositories = [Path(r) for r in summary["shards"]]
    assert summary["kind"] == "flat" and summary["recall_at_100"] == 1.0
    servers = []
    for i, repo in enumerate(repositories):
        http, grpc, metrics = free_ports(3)
        servers.append(
            ServerConfig(
                model_repository=str(repo),
                state_dir=str(tmp / f"state-{i}"),
                http_port=http,
                grpc_port=grpc,
                metrics_port=metrics,
            )
        )
    try:
        for server in servers:
            start(server)
        urls = [f"127.0.0.1:{s.grpc_port}" for s in servers]
        yield Shards(ids, vecs, ineligible, urls, servers, tmp / "updates")
    finally:
        for server in servers:
            stop(server)


def test_each_shard_holds_the_ads_of_its_id_residue(shards: Shards, tmp_path: Path) -> None:
    for i, server in enumerate(shards.servers):
        index = AdIndex.load(Path(server.model_repository) / "candgen_ad_shard" / "1" / "ads.faiss")
        held = np.sort(index.positions())
        assert held.tolist() == shards.ids[shard_of(shards.ids, 2) == i].tolist()
        assert 0.4 < len(held) / len(shards.ids) < 0.6


def test_merged_answers_equal_the_unsharded_exact_answers(shards: Shards) -> None:
    rng = np.random.default_rng(1)
    queries = shards.vectors[rng.choice(len(shards.ids), 20, replace=False)]
    queries = queries + 0.2 * rng.standard_normal(queries.shape).astype(np.float32)
    sharded = ShardedIndex(shards.urls)
    try:
        for q in queries:
            history = shards.ids[np.argsort(-(shards.vectors @ q))[:3]].tolist()  # its best 3
            keep = ~np.isin(shards.ids, [*shards.ineligible.tolist(), *history])
            want = exact_search(shards.ids[keep], shards.vectors[keep], q[None], 100)[0]
            got, scores = sharded.search(q, 100, history, keep=not_in(np.sort(shards.ineligible)))
            assert got.tolist() == want.tolist()
            by_id = dict(zip(shards.ids.tolist(), shards.vectors, strict=True))
            assert np.allclose(scores, [by_id[i] @ q for i in got.tolist()], atol=1e-5)
    finally:
        sharded.close()


@pytest.mark.parametrize("allowed_share", [0.3, 0.05])
def test_a_large_k_over_fetches_from_the_shards_for_the_allowed_ads(
    shards: Shards, allowed_share: float
) -> None:
    # K 300 asks each shard for 1,200 (more than the ensemble's max_k of 1,000), then 2,048.
    allowed = np.random.default_rng(5).random(len(shards.ids)) < allowed_share
    allowed_ids = np.sort(shards.ids[allowed])

    def keep(ids: np.ndarray) -> np.ndarray:
        return ~not_in(allowed_ids)(ids)

    sharded = ShardedIndex(shards.urls)
    try:
        q = shards.vectors[7]
        got, _ = sharded.search(q, 300, keep=keep)
        want = exact_search(shards.ids[allowed], shards.vectors[allowed], q[None], 300)[0]
        if allowed_share > 0.1:
            assert got.tolist() == want.tolist() and sharded.short_answers == 0
        else:  # 5% of the top 2 x 2,048 is about 205: short, in exact order, and counted
            assert 0 < len(got) < 300 and got.tolist() == want[: len(got)].tolist()
            assert sharded.short_answers == 1 and MAX_FETCH == 2048
    finally:
        sharded.close()


def test_a_bad_request_names_the_field_and_the_shards_keep_serving(shards: Shards) -> None:
    sharded = ShardedIndex(shards.urls)
    try:
        with pytest.raises(CandgenError, match=r"ad shard 0 \(127.0.0.1:\d+\): USER_VECTOR: "):
            sharded.search(np.zeros(5, np.float32), 10)
        with pytest.raises(CandgenError, match=r"ad shard 0 .*K: "):
            sharded.search(shards.vectors[0], 0)
        assert len(sharded.search(shards.vectors[0], 10)[0]) == 10
    finally:
        sharded.close()


def test_a_shard_that_is_down_is_named(shards: Shards) -> None:
    (unused,) = free_ports(1)
    sharded = ShardedIndex([shards.urls[0], f"127.0.0.1:{unused}"], timeout_s=2.0)
    try:
        with pytest.raises(CandgenError, match=rf"ad shard 1 \(127.0.0.1:{unused}\)"):
            sharded.search(shards.vectors[0], 10)
    finally:
        sharded.close()


# Last: it changes the shards' ads.
def test_each_shard_takes_its_own_new_ads_and_expiries_while_serving(shards: Shards) -> None:
    import time

    from candgen.serving.updates import write_update

    rng = np.random.default_rng(3)
    new_ids = AD + 100_000 + np.arange(20, dtype=np.int64)  # both residues
    new_vecs = rng.standard_normal((20, shards.vectors.shape[1])).astype(np.float32)
    new_vecs /= np.linalg.norm(new_vecs, axis=1, keepdims=True)
    expired = shards.ids[100:110]
    sharded = ShardedIndex(shards.urls)
    try:
        assert int(expired[0]) in sharded.search(shards.vectors[100], 5)[0].tolist()
        write_update(shards.updates, 1, new_ids, new_vecs, expired)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = [sharded.search(v, 1)[0].tolist() for v in new_vecs]  # never an error
            if found == [[i] for i in new_ids.tolist()]:
                break
            time.sleep(0.1)
        assert found == [[i] for i in new_ids.tolist()], "the new ads never became visible"
        for v in shards.vectors[100:110]:
            assert not set(sharded.search(v, 20)[0].tolist()) & set(expired.tolist())
    finally:
        sharded.close()
