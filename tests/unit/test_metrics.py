"""Metric functions against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from candgen.evaluation.metrics import (
    coverage,
    paired_difference,
    ranking_metrics,
    sampled_ranks,
    target_ranks,
    union_lists,
    user_recall,
)
from candgen.models.retriever import chunked_topk


def test_single_target_users_by_hand() -> None:
    # user 0 hits at rank 0, user 1 at rank 3, user 2 misses (rank >= K).
    ranks = np.array([0, 3, 100])
    m = ranking_metrics(ranks, np.array([0, 1, 2]), ks=(1, 5))
    assert m["users"] == 3
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@5"] == pytest.approx(2 / 3)
    assert m["recall@5"] == pytest.approx(2 / 3)  # one target per user: recall == HR
    assert m["ndcg@5"] == pytest.approx((1.0 + 1.0 / math.log2(5)) / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)


def test_multi_target_user_by_hand() -> None:
    # One user with targets at ranks 0 and 7: at K=5 one of two is found.
    m = ranking_metrics(np.array([0, 7]), np.array([0, 0]), ks=(5, 10))
    assert m["hr@5"] == 1.0
    assert m["recall@5"] == 0.5
    assert m["ndcg@5"] == pytest.approx(1.0 / (1.0 + 1.0 / math.log2(3)))
    assert m["recall@10"] == 1.0
    ideal = 1.0 + 1.0 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx((1.0 + 1.0 / math.log2(9)) / ideal)


def test_target_ranks_and_coverage() -> None:
    topk = np.array([[5, 2, 9], [1, 2, 3]])
    ranks = target_ranks(topk, np.array([0, 0, 1]), np.array([9, 4, 1]))
    assert ranks.tolist() == [2, 3, 0]
    assert coverage(topk, num_items=10, k=2) == pytest.approx(3 / 10)  # {5, 2, 1}


def test_chunked_topk_excludes_history_and_padding_and_matches_one_chunk() -> None:
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(51, 8, generator=gen)
    queries = torch.randn(7, 8, generator=gen)
    exclude = [np.array([1, 2, 3]), np.array([], dtype=np.int64)] + [
        np.array([i]) for i in range(5)
    ]
    one = chunked_topk(queries, table, 10, exclude)
    tiny = chunked_topk(queries, table, 10, exclude, max_bytes=1)  # one query per chunk
    assert torch.equal(one, tiny)
    scores = queries @ table.T
    scores[:, 0] = -torch.inf
    for i, ex in enumerate(exclude):
        assert not set(one[i].tolist()) & set(ex.tolist())
        assert 0 not in one[i].tolist()
        s = scores[i].clone()
        s[torch.as_tensor(ex, dtype=torch.long)] = -torch.inf
        assert one[i].tolist() == s.topk(10).indices.tolist()


def test_chunked_topk_rejects_k_beyond_the_catalogue() -> None:
    with pytest.raises(ValueError, match=r"k: must be in 1\.\.4"):
        chunked_topk(torch.ones(1, 2), torch.ones(5, 2), 5, [np.zeros(0, np.int64)])


def test_sampled_ranks_never_draw_interacted_items() -> None:
    # Items 1..5 are the user's history and score far above everything; the target (6) scores
    # above every other item. Were any history item drawn as a negative, the rank would be > 0.
    n = 300
    table = torch.zeros(n + 1, 1)
    table[1:6] = 100.0
    table[6] = 1.0
    table[7:] = torch.linspace(-1, 0.5, n - 6)[:, None]
    ranks = sampled_ranks(
        torch.ones(1, 1), table, np.array([6]), [np.array([1, 2, 3, 4, 5, 6])], seed=3
    )
    assert ranks.tolist() == [0]
    # A target that scores lowest ranks last among the 100 negatives.
    table[6] = -5.0
    ranks = sampled_ranks(torch.ones(1, 1), table, np.array([6]), [np.array([6])], seed=3)
    assert ranks.tolist() == [100]


def test_the_paired_difference_says_when_a_lead_is_within_the_noise() -> None:
    ours = np.array([1.0, 1.0, 0.0, 0.5, np.nan, 1.0])
    theirs = np.array([0.0, 1.0, 1.0, 0.5, 1.0, np.nan])
    small = paired_difference(ours, theirs)
    assert small["n"] == 4 and small["wins"] == 1 and small["losses"] == 1
    assert small["mean"] == 0.0 and small["low"] < 0.0 < small["high"]
    # A lead on most of many units is clear of zero.
    many = paired_difference(np.r_[np.ones(80), np.zeros(20)], np.zeros(100))
    assert many["mean"] == pytest.approx(0.8) and many["low"] > 0.6 and many["wins"] == 80
    with pytest.raises(ValueError, match="shapes"):
        paired_difference(np.zeros(3), np.zeros(4))


def test_user_recall_is_each_users_share_of_targets_in_the_top_k() -> None:
    # user 0: 2 of 3 targets in the top 5; user 1: none of 1; user 2 has no target.
    ranks = np.array([0, 4, 9, 7])
    users = np.array([0, 0, 0, 1])
    got = user_recall(ranks, users, 5, 3)
    assert got[:2].tolist() == [pytest.approx(2 / 3), 0.0] and np.isnan(got[2])
    # Its mean over users with targets is ranking_metrics' recall.
    assert np.nanmean(got) == pytest.approx(ranking_metrics(ranks, users, (5,))["recall@5"])


def test_a_union_gives_the_second_list_its_share_and_refills_duplicates_from_the_first() -> None:
    first = np.array([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, -1, -1, -1]])
    second = np.array([[9, 8, 7], [2, 8, -1], [9, -1, -1]])
    got = union_lists(first, second, 2)
    assert got[0].tolist() == [1, 2, 3, 9, 8]  # the first's top 3, the second's top 2
    assert got[1].tolist() == [1, 2, 3, 8, 4]  # 2 is held: the second reads on, then runs out
    assert got[2].tolist() == [1, 2, 9, -1, -1]  # gaps stay gaps when both lists run out
    none = union_lists(first, second, 0)  # no slots: the first list, its gaps refilled
    assert (none[:2] == first[:2]).all() and none[2].tolist() == [1, 2, 9, -1, -1]
    assert union_lists(first, second, 5)[0].tolist() == [9, 8, 7, 1, 2]
    from candgen.errors import ConfigError

    # As the quotas share slots: the second generator's S slots go to S ads not yet held.
    deeper = union_lists(np.array([[1, 2, 3, 4]]), np.array([[1, 5, 6, 7]]), 2)
    assert deeper[0].tolist() == [1, 2, 5, 6]
    with pytest.raises(ConfigError, match=r"^share: must lie in 0..5, got 6"):
        union_lists(first, second, 6)
    with pytest.raises(ConfigError, match=r"^second: 2 lists for 3"):
        union_lists(first, second[:2], 1)


def test_a_union_at_most_half_shared_is_what_the_serving_quotas_give() -> None:
    from candgen.serving.quota import allocate

    rng = np.random.default_rng(0)
    k, compared = 20, 0
    for _ in range(300):
        share = int(rng.integers(1, k // 2 + 1))
        first, second = rng.choice(60, k, replace=False), rng.choice(60, 30, replace=False)
        if len(set(second) - set(first[: k - share])) < share:
            continue  # the second list runs out: allocate's refill goes by weight
        lists = {"first": [(int(a), 0.0) for a in first], "second": [(int(a), 0.0) for a in second]}
        served = allocate(lists, {"first": (k - share) / k, "second": share / k}, k)
        assert union_lists(first[None], second[None], share)[0].tolist() == [
            c.ad_id for c in served]  # fmt: skip
        compared += 1
    assert compared > 200
