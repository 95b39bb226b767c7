"""Retrieval metrics: exact top-K in memory-bounded chunks, full-ranking and sampled protocols.

Full ranking: every catalogue item is scored, the user's history is excluded, and each target's
rank among the rest decides HR@K (any target in the top K), Recall@K (the share of targets in the
top K) and NDCG@K (binary-relevance DCG over the targets, divided by the ideal DCG). With one
target per user, HR@K and Recall@K coincide.

Sampled-100 (the SASRec paper's protocol): the target is ranked against 100 items drawn uniformly
from those the user never interacted with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from candgen.errors import ConfigError

KS: tuple[int, ...] = (5, 10, 20, 50, 100, 200)


def target_ranks(topk: np.ndarray, target_user: np.ndarray, target_item: np.ndarray) -> np.ndarray:
    """0-based rank of each target in its user's top-K list, or K where it is absent."""
    k = topk.shape[1]
    rows = topk[target_user]
    hit = rows == target_item[:, None]
    ranks: np.ndarray = np.where(hit.any(1), hit.argmax(1), k)
    return ranks


def ranking_metrics(
    ranks: np.ndarray, target_user: np.ndarray, ks: Sequence[int] = KS
) -> dict[str, float]:
    """HR@K, Recall@K and NDCG@K averaged over users that have at least one target.

    Args:
        ranks: (T,) 0-based rank of each target (>= the largest K when absent).
        target_user: (T,) which user each target belongs to.
        ks: cut-offs.

    Returns:
        ``{"hr@10": ..., "recall@10": ..., "ndcg@10": ..., "users": ...}``.
    """
    if len(ranks) == 0:
        return {"users": 0.0}
    users, inverse, counts = np.unique(target_user, return_inverse=True, return_counts=True)
    out: dict[str, float] = {"users": float(len(users))}
    gains = 1.0 / np.log2(ranks + 2.0)
    for k in ks:
        hit = ranks < k
        hits = np.bincount(inverse, weights=hit, minlength=len(users))
        dcg = np.bincount(inverse, weights=np.where(hit, gains, 0.0), minlength=len(users))
        ideal = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))[np.minimum(counts, k) - 1]
        out[f"hr@{k}"] = float((hits > 0).mean())
        out[f"recall@{k}"] = float((hits / counts).mean())
        out[f"ndcg@{k}"] = float((dcg / ideal).mean())
    return out


def coverage(topk: np.ndarray, num_items: int, k: int) -> float:
    """Share of the catalogue that appears in at least one user's top ``k`` (ids <= 0 fill
    lists that came up short and are not items)."""
    shown = np.unique(topk[:, :k])
    return float((shown > 0).sum() / num_items)


def sampled_ranks(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    target_item: np.ndarray,
    interacted: Sequence[np.ndarray],
    num_negatives: int = 100,
    seed: int = 0,
) -> np.ndarray:
    """Rank of each user's target among ``num_negatives`` uniformly drawn unseen items.

    Negatives are drawn per user, uniformly from 1..N, rejecting items the user interacted with
    (and repeats); the rank counts negatives that score strictly higher than the target.

    Args:
        queries: (M, D) one query per user.
        item_table: (N + 1, D).
        target_item: (M,) each user's target.
        interacted: per user, every item they interacted with (history and target).
        num_negatives: 100 in the SASRec protocol.
        seed: the sampling seed (fixed so that runs compare).

    Returns:
        (M,) 0-based ranks.
    """
    n = item_table.shape[0] - 1
    rng = np.random.default_rng(seed)
    negatives = np.zeros((len(target_item), num_negatives), dtype=np.int64)
    for i, seen in enumerate(interacted):
        if n - len(np.unique(seen)) < num_negatives:
            raise ConfigError(
                "protocol",
                f"user {i}: fewer than {num_negatives} unseen items to sample (a catalogue this "
                "small needs the full protocol)",
            )
        chosen: list[int] = []
        seen_set = set(seen.tolist())
        while len(chosen) < num_negatives:
            for c in rng.integers(1, n + 1, size=2 * num_negatives).tolist():
                if c not in seen_set:
                    seen_set.add(c)
                    chosen.append(c)
                    if len(chosen) == num_negatives:
                        break
        negatives[i] = chosen
    cand = torch.from_numpy(np.concatenate([target_item[:, None], negatives], axis=1))
    scores = torch.einsum("md,mcd->mc", queries, item_table[cand.to(item_table.device)])
    return (scores[:, 1:] > scores[:, :1]).sum(1).cpu().numpy()


def union_lists(first: np.ndarray, second: np.ndarray, share: int) -> np.ndarray:
    """(T, K) each row's candidates when a second generator gets ``share`` of K slots: the
    first list's top ``K - share``, then the second list's first ``share`` ads not already held
    (read as deep as it takes), then both lists' next ones (the first's, then the second's)
    until K are held or both run out (-1 fills; negative entries in either list are gaps).
    With ``share`` at most K / 2 and enough new ads in the second list, these are the ads and
    the order the serving quotas give (``candgen.serving.quota.allocate``: the larger share
    takes first; its refill of a list that runs out goes by weight).

    Args:
        first: (T, K) the main generator's lists, best first.
        second: (T, M) the second generator's lists, best first.
        share: slots of K the second generator fills first.
    """
    if first.shape[0] != second.shape[0]:
        raise ConfigError("second", f"{second.shape[0]} lists for {first.shape[0]}")
    k = first.shape[1]
    if not 0 <= share <= k:
        raise ConfigError("share", f"must lie in 0..{k}, got {share}")
    out = np.full(first.shape, -1, np.int64)
    for row, (a, b) in enumerate(zip(first.tolist(), second.tolist(), strict=True)):
        held = dict.fromkeys(x for x in a[: k - share] if x >= 0)
        taken, rest = 0, len(b)
        for i, x in enumerate(b):
            if taken == share:
                rest = i
                break
            if x >= 0 and x not in held:
                held[x] = None
                taken += 1
        for x in (*a[k - share :], *b[rest:]):
            if len(held) == k:
                break
            if x >= 0:
                held.setdefault(x)
        out[row, : len(held)] = list(held)
    return out


def user_recall(ranks: np.ndarray, target_user: np.ndarray, k: int, num_users: int) -> np.ndarray:
    """(num_users,) each user's Recall@K over its targets; NaN for a user with none."""
    counts = np.bincount(target_user, minlength=num_users).astype(np.float64)
    hits = np.bincount(target_user, weights=ranks < k, minlength=num_users)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / counts, np.nan)


def paired_difference(
    a: np.ndarray, b: np.ndarray, resamples: int = 2_000, seed: int = 0
) -> dict[str, float]:
    """Mean of ``a - b`` over the units (users, requests) both score (not NaN), with a 95%
    paired bootstrap interval and how many units each side wins: whether a lead exceeds the
    noise of the units it was measured on.

    Returns:
        ``{"mean", "low", "high", "wins", "losses", "n"}``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: shapes {a.shape} and {b.shape} differ")
    keep = ~(np.isnan(a) | np.isnan(b))
    diff = a[keep] - b[keep]
    if len(diff) == 0:
        return {"mean": 0.0, "low": 0.0, "high": 0.0, "wins": 0, "losses": 0, "n": 0}
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(1)
    low, high = np.quantile(means, [0.025, 0.975])
    return {
        "mean": float(diff.mean()),
        "low": float(low),
        "high": float(high),
        "wins": int((diff > 0).sum()),
        "losses": int((diff < 0).sum()),
        "n": len(diff),
    }
