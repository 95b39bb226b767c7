"""Content (cold start) and popularity/pacing generators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from candgen.errors import ConfigError
from candgen.index.ann import VectorFile
from candgen.serving.generators import ContentGenerator, PacingPopularity

AD = 1_000_000_000


def _content(n: int = 60, cats: int = 3) -> tuple[ContentGenerator, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((cats, 16))
    categories = np.arange(n) % cats
    text = centers[categories] + 0.1 * rng.standard_normal((n, 16))
    ids = AD + np.arange(n)
    return ContentGenerator(ids, text, categories, cats), ids, centers


def test_recent_ads_pull_in_ads_with_similar_text() -> None:
    gen, ids, _ = _content()
    found = gen.candidates([int(ids[0]), int(ids[3])], None, 10)  # both category 0
    assert len(found) == 10
    assert all((ad - AD) % 3 == 0 for ad, _ in found)


def test_a_brand_new_ad_is_retrievable_at_once() -> None:
    gen, ids, centers = _content()
    new_id = AD + 10_000
    gen.add(new_id, centers[1] * 5)  # exactly the category-1 direction
    found = gen.candidates([int(ids[1])], None, 3)  # a category-1 ad in the history
    assert new_id in [ad for ad, _ in found]


def test_users_without_ads_fall_back_to_category_affinity_then_nothing() -> None:
    gen, _, _ = _content()
    found = gen.candidates([12345], [0.0, 0.0, 1.0], 5)  # an organic item, likes category 2
    assert found and all((ad - AD) % 3 == 2 for ad, _ in found)
    assert gen.candidates([], None, 5) == []
    assert gen.candidates([], [0.0, 0.0, 0.0], 5) == []


def test_pacing_damps_ads_running_out_of_budget() -> None:
    ids = np.array([1, 2, 3, 4])
    pop = PacingPopularity(ids, clicks=np.array([50, 50, 5, 0]),
                           impressions=np.array([1000, 1000, 1000, 1000]),
                           budget_left_fraction=np.array([0.9, 0.1, 0.9, 0.0]))  # fmt: skip
    # Ads 1 and 2 have the same CTR, but ad 2 has 10% of its budget left (pacing 0.2), which
    # still beats ad 3's tenfold lower CTR; ad 4's budget is exhausted, so it is never offered.
    assert [ad for ad, _ in pop.candidates(10)] == [1, 2, 3]
    assert [ad for ad, _ in pop.candidates(2, exclude=[1])] == [2, 3]


def test_bad_input_names_the_field() -> None:
    with pytest.raises(ConfigError, match="k: must be > 0"):
        PacingPopularity(np.array([1]), np.array([1]), np.array([1]), np.array([1.0])).candidates(0)
    with pytest.raises(ConfigError, match=r"categories: must lie in 0\.\.2"):
        ContentGenerator(np.array([1]), np.ones((1, 4)), np.array([5]), 3)


def test_the_query_and_item_generators_search_with_their_context_vectors() -> None:
    from candgen.index.ann import AdIndex, IndexConfig
    from candgen.serving.pipeline import UserContext, check_context_item, generate

    content, ids, centers = _content()
    rng = np.random.default_rng(1)
    ad_vectors = rng.standard_normal((len(ids), 8)).astype(np.float32)
    ad_vectors /= np.linalg.norm(ad_vectors, axis=1, keepdims=True)  # inner product = cosine
    ad_index = AdIndex.build(ids, ad_vectors, IndexConfig(kind="flat"))
    pop = PacingPopularity(ids, np.ones(len(ids)), np.full(len(ids), 100), np.ones(len(ids)))
    user = UserContext(history=[int(ids[1])])
    plain = generate(user, None, 5, ad_index, content, pop, frozenset())
    assert set(plain) == {"content", "popularity"}  # no context: neither context generator runs
    query = (centers[2] / np.linalg.norm(centers[2])).astype(np.float32)
    found = generate(user, None, 5, ad_index, content, pop, frozenset(), query, ad_vectors[7])
    assert list(found) == ["content", "query", "item", "popularity"]
    # query: the ads whose text is nearest the query's embedding (category 2's), the user's own
    # history excluded; item: the ads nearest the item's vector in the ad index.
    assert all((ad - AD) % 3 == 2 for ad, _ in found["query"])
    assert found["item"][0][0] == ids[7]
    assert int(ids[1]) not in [ad for ad, _ in found["item"]]
    check_context_item(None, ad_index, content)
    check_context_item(12345, ad_index, content)  # an organic item
    with pytest.raises(ConfigError, match=rf"^CONTEXT_ITEM_ID: {ids[3]} is an ad"):
        check_context_item(int(ids[3]), ad_index, content)


def test_the_popularity_floor_spreads_over_advertisers_when_asked() -> None:
    ids = np.arange(1, 21, dtype=np.int64)
    pop = PacingPopularity(ids, np.arange(20, 0, -1), np.full(20, 100), np.ones(20))
    owner = dict(zip(ids.tolist(), [1] * 10 + list(range(2, 12)), strict=True))
    found = pop.candidates(
        8,
        allows=lambda a: np.ones(len(a), bool),
        advertisers=lambda a: np.array([owner[int(x)] for x in a]),
        per_advertiser=2,
    )
    assert [ad for ad, _ in found] == [1, 2, 11, 12, 13, 14, 15, 16]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_popularity_floor_matches_the_rule_ad_by_ad(seed: int) -> None:
    # The vectorised floor against the rule read one ad at a time, on a long ranking with most
    # ads not allowed, a few advertisers owning many ads, unknown owners and the user's history.
    rng = np.random.default_rng(seed)
    ids = np.arange(1, 3_001, dtype=np.int64)
    pop = PacingPopularity(ids, rng.integers(0, 50, 3_000), np.full(3_000, 100), np.ones(3_000))
    allowed = dict(zip(ids.tolist(), (rng.random(3_000) < 0.4).tolist(), strict=True))
    owner = dict(zip(ids.tolist(), rng.integers(-1, 30, 3_000).tolist(), strict=True))
    history = set(rng.choice(ids, 200, replace=False).tolist())
    found = pop.candidates(
        150,
        exclude=history,
        allows=lambda a: np.array([allowed[int(x)] for x in a], bool),
        advertisers=lambda a: np.array([owner[int(x)] for x in a], np.int64),
        per_advertiser=3,
    )
    expected, counts = [], {}
    for ad, score in pop.ranked:
        if not allowed[ad] or ad in history:
            continue
        if owner[ad] >= 0 and counts.get(owner[ad], 0) >= 3:
            continue
        counts[owner[ad]] = counts.get(owner[ad], 0) + 1
        expected.append((ad, score))
        if len(expected) == 150:
            break
    assert found == expected


def test_text_vectors_are_read_from_disk_by_row_and_new_ads_join_them(tmp_path: Path) -> None:
    from candgen.serving.generators import TextVectors

    rng = np.random.default_rng(0)
    ids = np.array([30, 10, 20], np.int64) + 1_000_000_000
    text = rng.standard_normal((3, 8)).astype(np.float32)
    gen = ContentGenerator(ids, text, np.array([0, 1, 0]), 2)
    gen.save(tmp_path)
    loaded = ContentGenerator.load(tmp_path)
    assert isinstance(loaded.text.vectors, VectorFile)  # read by row, not into memory
    assert sorted(loaded.text) == sorted(ids.tolist()) and len(loaded.text) == 3
    for ad, vec in zip(ids.tolist(), text, strict=True):
        assert np.allclose(loaded.text[ad], vec / np.linalg.norm(vec))
    assert 1 not in loaded.text and "x" not in loaded.text
    new = rng.standard_normal(8).astype(np.float32)
    loaded.add(1_000_000_040, new)
    assert 1_000_000_040 in loaded.text and len(loaded.text) == 4
    taken = loaded.text.take(np.array([1_000_000_040, 5, ids[0]]))
    assert np.allclose(taken[0], new / np.linalg.norm(new)) and not taken[1].any()
    same, found = loaded.text.lookup(np.array([1_000_000_040, 5, ids[0]]))
    assert np.array_equal(same, taken) and found.tolist() == [True, False, True]
    loaded.save(tmp_path / "again")
    assert sorted(ContentGenerator.load(tmp_path / "again").text) == sorted(
        [*ids.tolist(), 1_000_000_040]
    )
    with pytest.raises(ConfigError, match=r"^ad_ids: an ad id appears more than once"):
        TextVectors.of(np.array([1, 1]), np.zeros((2, 8)))


def test_a_generator_built_from_a_text_file_answers_as_one_built_in_memory(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(3)
    n, cats = 500, 4
    ids = AD + 2 * np.arange(n)
    categories = rng.integers(0, cats, n)
    text = (3.0 * rng.standard_normal((n, 16))).astype(np.float32)  # not unit length
    in_memory = ContentGenerator(ids, text, categories, cats)
    folder = tmp_path / "content"
    folder.mkdir()
    from candgen.serving.generators import TEXT_FILE

    np.save(folder / TEXT_FILE, text)
    from_file = ContentGenerator.from_file(ids, folder / TEXT_FILE, categories, cats)
    assert np.allclose(np.linalg.norm(np.load(folder / TEXT_FILE), axis=1), 1.0, atol=1e-5)
    assert np.allclose(from_file.centroids, in_memory.centroids, atol=1e-5)
    assert isinstance(from_file.text.vectors, VectorFile)
    for recent in ([ids[0], ids[9]], [ids[42]]):
        assert from_file.candidates(recent, None, 20) == in_memory.candidates(recent, None, 20)
    before = (folder / TEXT_FILE).stat().st_mtime_ns
    from_file.save(folder)  # its own text file: no second copy is written over it
    assert (folder / TEXT_FILE).stat().st_mtime_ns == before
    loaded = ContentGenerator.load(folder)
    assert loaded.candidates([ids[42]], None, 20) == in_memory.candidates([ids[42]], None, 20)
    with pytest.raises(ConfigError, match=r"^ad_ids: text vectors' ad ids must be sorted"):
        ContentGenerator.from_file(ids[::-1].copy(), folder / TEXT_FILE, categories, cats)
    with pytest.raises(ConfigError, match=r"^categories: must lie in 0..3"):
        ContentGenerator.from_file(ids, folder / TEXT_FILE, categories + cats, cats)


def test_category_sums_equal_adding_each_vector_to_its_category(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import candgen.serving.generators as generators

    rng = np.random.default_rng(6)
    categories = rng.integers(0, 5, 1_000)
    vectors = rng.standard_normal((1_000, 12)).astype(np.float32)
    expected = np.zeros((5, 12), np.float32)
    np.add.at(expected, categories, vectors)
    monkeypatch.setattr(generators, "_SUM_BLOCK", 64)  # many blocks, a short last one
    assert np.allclose(generators._category_sums(categories, vectors, 5), expected, atol=1e-4)
