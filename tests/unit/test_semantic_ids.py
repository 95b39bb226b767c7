"""Semantic IDs by residual k-means (``candgen.models.semantic_ids``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from candgen.errors import ConfigError, DataFormatError
from candgen.models.semantic_ids import SemanticIdConfig, SemanticIds


def _embeddings(n: int = 600, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim)).astype(np.float32)
    return centres[rng.integers(0, 12, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)


def test_each_level_explains_more_of_the_embedding() -> None:
    x = _embeddings()
    errors = []
    for levels in (1, 2, 3):
        ids = SemanticIds.fit(x, SemanticIdConfig(levels=levels, codebook_size=16))
        codes = ids.encode(x)
        assert codes.shape == (len(x), levels) and codes.min() >= 0 and codes.max() < 16
        errors.append(float(((ids.decode(codes) - x) ** 2).sum(axis=1).mean()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] < float(((x - x.mean(0)) ** 2).sum(axis=1).mean())  # better than one point


def test_every_item_gets_its_own_id_and_a_new_item_one_from_its_content(tmp_path: Path) -> None:
    x = _embeddings()
    x[10] = x[3]  # two items with the same content: same codes, told apart by the last token
    config = SemanticIdConfig(levels=2, codebook_size=8, seed=3)
    ids = SemanticIds.fit(x, config)
    item_ids = np.arange(1, len(x) + 1) * 5
    table = ids.assign(item_ids, x)
    assert table.shape == (len(x), 3)
    assert len({tuple(row) for row in table.tolist()}) == len(x)
    assert table[3, :2].tolist() == table[10, :2].tolist() and table[3, 2] != table[10, 2]
    same = np.flatnonzero((table[:, :2] == table[3, :2]).all(axis=1))
    assert table[same, 2].tolist() == list(range(len(same)))  # 0, 1, ... in item id order
    # the same embeddings and seed give the same IDs; a saved table encodes as before
    assert np.array_equal(SemanticIds.fit(x, config).assign(item_ids, x), table)
    ids.save(tmp_path / "codebooks.npz")
    loaded = SemanticIds.load(tmp_path / "codebooks.npz")
    fresh = _embeddings(5, seed=9)  # never seen: its codes come from its embedding alone
    assert np.array_equal(loaded.encode(fresh), ids.encode(fresh))


def test_bad_input_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^levels: must be an integer >= 1"):
        SemanticIdConfig(levels=0)
    with pytest.raises(ConfigError, match=r"^codebook_size: must be an integer >= 1"):
        SemanticIdConfig(codebook_size=True)
    x = _embeddings(50)
    ids = SemanticIds.fit(x, SemanticIdConfig(levels=1, codebook_size=4))
    with pytest.raises(ConfigError, match=r"^embeddings: expected \(n, 16\)"):
        ids.encode(np.zeros((3, 8)))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ConfigError, match=r"^embeddings: embeddings hold NaN"):
        SemanticIds.fit(bad)
    with pytest.raises(ConfigError, match=r"^item_ids: item ids repeat"):
        ids.assign(np.ones(50, np.int64), x)
    (tmp_path / "bad.npz").write_text("not an archive")
    with pytest.raises(DataFormatError, match=r"bad\.npz: not a semantic ID codebook file"):
        SemanticIds.load(tmp_path / "bad.npz")
    # a level never has more centroids than items
    few = SemanticIds.fit(x[:3], SemanticIdConfig(levels=2, codebook_size=256))
    assert few.codebooks[0].shape == (3, 16)


def _scorer(vocab: int, seed: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A fixed next-token distribution per query and prefix, as a generative model's step."""

    def next_log_probs(rows: np.ndarray, prefixes: np.ndarray) -> np.ndarray:
        out = []
        for row, prefix in zip(rows.tolist(), prefixes.tolist(), strict=True):
            rng = np.random.default_rng([seed, row, len(prefix), *prefix])
            logits = rng.standard_normal(vocab)
            out.append(logits - np.log(np.exp(logits).sum()))
        return np.stack(out)

    return next_log_probs


def test_beam_search_generates_only_ids_that_exist_and_a_wide_beam_finds_the_best() -> None:
    from candgen.models.semantic_ids import IdTrie, constrained_beam_search

    x = _embeddings(300)
    ids = SemanticIds.fit(x, SemanticIdConfig(levels=2, codebook_size=6))
    items = np.arange(1, 301) * 7
    table = ids.assign(items, x)
    vocab = int(table.max()) + 1
    trie = IdTrie(table, items, (vocab,) * table.shape[1])
    score = _scorer(vocab, seed=1)
    wide_items, wide_scores = constrained_beam_search(score, trie, 3, beam_width=300, k=10)
    for query in range(3):
        # brute force: every existing ID's summed log-probability
        exact = []
        for row, item in zip(table.tolist(), items.tolist(), strict=True):
            steps = [score(np.array([query]), np.array([row[:i]]))[0][row[i]] for i in range(3)]
            exact.append((item, float(sum(steps))))
        exact.sort(key=lambda pair: -pair[1])
        assert wide_items[query].tolist() == [item for item, _ in exact[:10]]
        assert wide_scores[query] == pytest.approx([s for _, s in exact[:10]])
    narrow, narrow_scores = constrained_beam_search(score, trie, 3, beam_width=10, k=10)
    assert set(narrow.ravel().tolist()) <= set(items.tolist())
    # a narrow beam keeps, at each level, the best beam_width of every beam x allowed token
    for query in range(3):
        beams: list[tuple[float, list[int]]] = [(0.0, [])]
        for level in range(3):
            grown = [
                (total + float(score(np.array([query]), np.array([p]))[0][t]), [*p, t])
                for total, p in beams
                for t in range(vocab)
                if any(row[: level + 1] == [*p, t] for row in table.tolist())
            ]
            beams = sorted(grown, key=lambda pair: -pair[0])[:10]
        assert narrow_scores[query] == pytest.approx([total for total, _ in beams])
    # a subset (say, the ads a request may get) generates only from the subset
    allowed = items[::3]
    sub = IdTrie(table[::3], allowed, trie.vocab_sizes)
    found, _ = constrained_beam_search(score, sub, 2, beam_width=20, k=20)
    assert set(found.ravel().tolist()) <= set(allowed.tolist())
    # fewer IDs than k: the rest is -1 at -inf
    tiny = IdTrie(table[:2], items[:2], trie.vocab_sizes)
    few, few_scores = constrained_beam_search(score, tiny, 1, beam_width=5, k=5)
    assert sorted(few[0, :2].tolist()) == sorted(items[:2].tolist())
    assert few[0, 2:].tolist() == [-1] * 3 and np.isneginf(few_scores[0, 2:]).all()
    with pytest.raises(ConfigError, match=r"^beam_width: must be >= k >= 1"):
        constrained_beam_search(score, trie, 1, beam_width=5, k=10)
    with pytest.raises(ConfigError, match=r"^ids: items 7 and 14 share the ID"):
        IdTrie(np.array([[1, 2], [1, 2]]), np.array([7, 14]))
    with pytest.raises(ConfigError, match=r"^vocab_sizes: \(2, 2\) do not hold"):
        IdTrie(np.array([[1, 2]]), np.array([7]), (2, 2))
    with pytest.raises(ConfigError, match=r"^next_log_probs: returned \(2, 2\)"):
        constrained_beam_search(_scorer(2, seed=0), trie, 2, beam_width=10, k=5)


def test_an_id_table_round_trips_and_a_bad_one_names_the_file(tmp_path: Path) -> None:
    from candgen.models.semantic_ids import SemanticIdTable

    x = _embeddings(40)
    books = SemanticIds.fit(x, SemanticIdConfig(levels=2, codebook_size=4))
    items = np.arange(1, 41) * 3
    table = SemanticIdTable(items, books.assign(items, x), books, source="m.pt")
    table.save(tmp_path / "ids.npz")
    back = SemanticIdTable.load(tmp_path / "ids.npz")
    assert back.source == "m.pt" and np.array_equal(back.ids, table.ids)
    # aligned to a data set's ids: padding row first, any order
    wanted = np.array([0, 9, 3, 120])
    assert np.array_equal(back.aligned(wanted)[1:], table.ids[[2, 0, 39]])
    assert (back.aligned(wanted)[0] == 0).all()
    with pytest.raises(ConfigError, match=r"^semantic_ids: 1 items have no ID in the table"):
        back.aligned(np.array([0, 3, 4]))
    bad = [
        (SemanticIdTable(items, -table.ids, books), "ids hold negative tokens"),
        (SemanticIdTable(np.ones(40, np.int64), table.ids, books), "item_ids repeat"),
        (SemanticIdTable(items[:5], table.ids, books), "ids and item_ids do not match"),
    ]
    for i, (broken, message) in enumerate(bad):
        broken.save(tmp_path / f"bad{i}.npz")
        with pytest.raises(DataFormatError, match=rf"bad{i}\.npz: {message}"):
            SemanticIdTable.load(tmp_path / f"bad{i}.npz")
