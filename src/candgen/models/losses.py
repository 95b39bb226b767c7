"""Sampled softmax with log-Q correction, shared by every retrieval model.

A full softmax over millions of ads is too costly, so each positive competes with a sample of
negatives: the other positives in the batch (drawn in proportion to popularity) plus items drawn
uniformly from the catalogue. Each negative's logit is corrected by the log of its expected count
in the sample (log-Q), so that popular items are not over-penalised for appearing in batches often.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from candgen.errors import ConfigError


def sampled_softmax_loss(
    queries: torch.Tensor,
    positive_ids: torch.Tensor,
    embed_items: Callable[[torch.Tensor], torch.Tensor],
    *,
    num_uniform: int,
    num_items: int,
    log_popularity: torch.Tensor | None,
    temperature: float,
    in_batch: bool = True,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Sampled-softmax loss of ``queries`` against their positives.

    Args:
        queries: (N, D) query embeddings (already normalised if the model is cosine).
        positive_ids: (N,) item ids in 1..num_items (0 is padding and must be filtered out).
        embed_items: maps (M,) item ids to their (M, D) output embeddings.
        num_uniform: how many negatives to draw uniformly from 1..num_items (shared by the batch).
        num_items: the catalogue size.
        log_popularity: (num_items + 1,) log of each item's share of training positives; needed
            for the log-Q correction of in-batch negatives.
        temperature: logits are divided by it.
        in_batch: also use the batch's other positives as negatives.
        generator: random source for the uniform negatives (fixed seeds).
        reduction: ``mean`` or ``none`` (one loss per query).

    Returns:
        The mean loss, or (N,) losses.
    """
    n = positive_ids.shape[0]
    use_batch = in_batch and n > 1
    if num_uniform <= 0 and not use_batch:
        raise ConfigError(
            "num_negatives", "the sampled loss needs num_uniform > 0 or in_batch with n > 1"
        )
    if use_batch and log_popularity is None:
        raise ConfigError("log_popularity", "in-batch negatives need it for the log-Q correction")

    def log_expected_count(ids: torch.Tensor) -> torch.Tensor:
        # Under the union of both samplers, item j is expected n * p(j) + U / N times.
        count = torch.zeros(ids.shape, dtype=queries.dtype, device=queries.device)
        if num_uniform > 0:
            count = count + num_uniform / num_items
        if use_batch:
            assert log_popularity is not None
            count = count + n * log_popularity[ids].exp()
        return count.log()

    pos_emb = embed_items(positive_ids)
    pos_logit = (queries * pos_emb).sum(-1) / temperature - log_expected_count(positive_ids)
    parts: list[torch.Tensor] = []
    if num_uniform > 0:
        neg_ids = torch.randint(1, num_items + 1, (num_uniform,), generator=generator).to(
            positive_ids.device
        )
        logits = queries @ embed_items(neg_ids).T / temperature
        logits = logits - log_expected_count(neg_ids)[None, :]
        parts.append(logits.masked_fill(neg_ids[None, :] == positive_ids[:, None], -1e9))
    if use_batch:
        unique_ids, inverse = torch.unique(positive_ids, return_inverse=True)
        logits = queries @ embed_items(unique_ids).T / temperature
        logits = logits - log_expected_count(unique_ids)[None, :]
        hit = torch.zeros_like(logits, dtype=torch.bool)
        hit[torch.arange(n, device=logits.device), inverse] = True
        parts.append(logits.masked_fill(hit, -1e9))
    all_logits = torch.cat([pos_logit[:, None], *parts], dim=1)
    target = torch.zeros(n, dtype=torch.long, device=queries.device)
    return F.cross_entropy(all_logits, target, reduction=reduction)


def full_softmax_loss(
    queries: torch.Tensor,
    positive_ids: torch.Tensor,
    item_embeddings: torch.Tensor,
    temperature: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy over the whole catalogue (row 0, the padding item, is excluded).

    Args:
        queries: (N, D).
        positive_ids: (N,) ids in 1..num_items.
        item_embeddings: (num_items + 1, D).
        temperature: logits are divided by it.
        reduction: ``mean`` or ``none`` (one loss per query).

    Returns:
        The mean loss, or (N,) losses.
    """
    logits = queries @ item_embeddings[1:].T / temperature
    return F.cross_entropy(logits, positive_ids - 1, reduction=reduction)
