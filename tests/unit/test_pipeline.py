"""The retrieval pipeline's logic: generators, quotas, eligibility, cold start and fallback.

The feature source is a stub here (pure logic); the real Feast feature server is exercised in
tests/integration/test_feature_server.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from candgen.errors import ConfigError
from candgen.features.client import FeatureStoreUnavailable
from candgen.index.ann import AdIndex, IndexConfig, ad_rows
from candgen.models.factory import load_model
from candgen.models.retriever import Retriever
from candgen.serving.generators import ContentGenerator, PacingPopularity
from candgen.serving.pipeline import RetrievalPipeline
from candgen.training.config import TrainConfig
from candgen.training.trainer import train

FIRST_AD = 151  # in the planted set, items 151..300 play the ads


class StubFeatures:
    def __init__(self) -> None:
        self.down = False
        self.users: dict[int, dict[str, Any]] = {
            7: {
                "recent_item_ids": [1, 2, 3],
                "recent_timestamps": None,
                "category_affinity": None,
            },
        }

    def lookup(self, service: str, entity: str, key: int) -> dict[str, Any] | None:
        if self.down:
            raise FeatureStoreUnavailable("feature server: connection refused")
        return self.users.get(key)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> RetrievalPipeline:
    out = tmp_path_factory.mktemp("pipe")
    result = train(TrainConfig(dataset="planted", model="sasrec", epochs=3, max_len=20,
                               batch_size=64, progress=False, track=False,
                               out_dir=str(out)))  # fmt: skip
    model, saved = load_model(Path(result.model_path))
    retriever = Retriever(model, saved.item_ids, max_len=20)
    ids, vectors = ad_rows(saved.item_ids, retriever.item_table.numpy(), FIRST_AD)
    rng = np.random.default_rng(0)
    content = ContentGenerator(ids, rng.standard_normal((len(ids), 8)), (ids - FIRST_AD) % 4, 4)
    popularity = PacingPopularity(ids, clicks=ids % 7, impressions=np.full(len(ids), 100),
                                  budget_left_fraction=np.ones(len(ids)))  # fmt: skip
    return RetrievalPipeline(retriever, AdIndex.build(ids, vectors, IndexConfig(kind="flat")),
                             content, popularity, StubFeatures(), max_k=200)  # fmt: skip


def test_a_known_user_gets_deduplicated_eligible_ads_from_the_generators(
    pipeline: RetrievalPipeline,
) -> None:
    pipeline.ineligible = {151, 152, 153}
    try:
        res = pipeline.retrieve(7, "home", 30)
    finally:
        pipeline.ineligible = set()
    assert len(res.ad_ids) == 30 == len(set(res.ad_ids))
    assert all(a >= FIRST_AD for a in res.ad_ids)
    assert not {151, 152, 153} & set(res.ad_ids)
    assert set(res.sources) <= {"sequential", "content", "popularity"}
    assert res.sources.count("sequential") >= 15  # home gives the sequential model 60%
    assert not res.cold_start and not res.fallback


def test_an_unknown_user_gets_cold_start_candidates(pipeline: RetrievalPipeline) -> None:
    res = pipeline.retrieve(424242, "search", 20)
    assert res.cold_start and len(res.ad_ids) == 20
    assert set(res.sources) == {"popularity"}


def test_an_unreachable_feature_store_falls_back_and_says_so(pipeline: RetrievalPipeline) -> None:
    pipeline.features.down = True  # type: ignore[attr-defined]
    try:
        res = pipeline.retrieve(7, "home", 20, recent_item_ids=[160, 161])
    finally:
        pipeline.features.down = False  # type: ignore[attr-defined]
    assert res.fallback and not res.cold_start
    assert "sequential" in res.sources  # the request's own recent items still drive the model
    assert not {160, 161} & set(res.ad_ids)


def test_fewer_eligible_ads_than_k_gives_fewer_results(pipeline: RetrievalPipeline) -> None:
    pipeline.ineligible = set(range(FIRST_AD, 296))
    try:
        res = pipeline.retrieve(7, "related", 100)
    finally:
        pipeline.ineligible = set()
    assert sorted(res.ad_ids) == [296, 297, 298, 299, 300]


@pytest.mark.parametrize(("k", "scenario", "message"), [
    (0, "home", r"K: must be in 1\.\.200, got 0"),
    (201, "home", r"K: must be in 1\.\.200, got 201"),
    (10, "inbox", "scenario: unknown surface 'inbox'"),
])  # fmt: skip
def test_bad_requests_name_the_field(
    pipeline: RetrievalPipeline, k: int, scenario: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        pipeline.retrieve(7, scenario, k)


def test_the_generative_generator_writes_only_ads_a_request_may_be_shown(
    pipeline: RetrievalPipeline, tmp_path: Path
) -> None:
    """Semantic IDs from a dense model's items, a generative model over them; its beam search
    writes only ads, and the generators step keeps those not ineligible and not in the history."""
    from candgen.index.semantic import build_semantic_ids
    from candgen.models.semantic_ids import SemanticIdConfig
    from candgen.serving.generative import GenerativeAds
    from candgen.serving.pipeline import UserContext, written_ads
    from candgen.serving.quota import QuotaConfig, QuotaPolicy

    result = train(TrainConfig(dataset="planted", model="sasrec", epochs=1, max_len=20,
                               batch_size=128, progress=False, track=False,
                               out_dir=str(tmp_path / "dense")))  # fmt: skip
    ids_file = tmp_path / "ids.npz"
    build_semantic_ids(result.model_path, ids_file, SemanticIdConfig(levels=2, codebook_size=8))
    gen = train(TrainConfig(dataset="planted", model="generative", semantic_ids=str(ids_file),
                            examples="prefixes", batch_by_length=True, epochs=2, max_len=20,
                            batch_size=128, beam_width=60, progress=False, track=False,
                            out_dir=str(tmp_path / "gen")))  # fmt: skip
    ads = np.arange(FIRST_AD, 301)
    generative = GenerativeAds.load(gen.model_path, np.r_[ads, 10**9], depth=60)
    assert generative.unknown_ads == 1  # an ad the model never saw has no ID to write
    users = [UserContext(history=[1, 2, 3]), UserContext(history=[-5])]
    written = written_ads(generative, users, ["home"] * 2, [None] * 2, [None] * 2)
    assert written[1] is None  # nothing known of the user: no state to write from
    assert written[0] is not None
    found, scores = written[0]
    assert len(found) == 60 and set(found.tolist()) <= set(ads.tolist())
    assert (np.diff(scores) <= 1e-6).all()
    # Half of home's slots to it; one ad it writes is already seen, the best it then writes
    # is ineligible.
    second = int(found[1])
    now = written_ads(
        generative, [UserContext(history=[1, 2, 3, second])], ["home"], [None], [None]
    )[0]
    assert now is not None
    first = int(now[0][0])
    shares = {"home": {"generative": 0.5, "sequential": 0.5}}
    pipeline.quotas = QuotaPolicy("fixed", QuotaConfig(), shares)
    pipeline.generative = generative
    pipeline.ineligible = {first}
    try:
        res = pipeline.retrieve(7, "home", 20, recent_item_ids=[second])
    finally:
        pipeline.quotas, pipeline.generative, pipeline.ineligible = QuotaPolicy(), None, set()
    assert res.sources.count("generative") == 10 and res.source_counts["generative"] == 10
    assert not {first, second} & set(res.ad_ids)
    mine = [a for a, s in zip(res.ad_ids, res.sources, strict=True) if s == "generative"]
    kept = [a for a in now[0].tolist() if a not in (first, second)]
    assert mine == kept[:10]  # in the order written (equal weights: it goes first)
