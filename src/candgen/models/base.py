"""What every candgen retrieval model offers the trainer, the evaluator and the index builder."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from candgen.data.tensors import Batch
from candgen.errors import ConfigError

Similarity = Literal["dot", "cosine"]


class RetrievalModel(nn.Module):
    """A user encoder and an item embedding table scored by one similarity.

    Subclasses implement ``encode_positions`` and ``raw_item_embeddings``. The similarity the
    model was trained with is the one the ANN index must use: with ``cosine`` both sides are
    L2-normalised here, so an inner-product index serves it exactly.

    Args:
        num_items: catalogue size; item ids are 1..num_items and 0 is padding.
        similarity: ``dot`` or ``cosine``.
        temperature: the softmax temperature used in training (kept for the loss).
    """

    # A contextual model's query also depends on the request's label and surface
    # (batch["labels"], batch["scenarios"]); the evaluator then asks for each target's own.
    contextual: bool = False

    def __init__(self, num_items: int, similarity: Similarity, temperature: float) -> None:
        super().__init__()
        self.num_items = num_items
        self.similarity: Similarity = similarity
        self.temperature = temperature

    def encode_positions(self, batch: Batch) -> torch.Tensor:
        """Returns (B, L, D) un-normalised user states, one after each history position."""
        raise NotImplementedError

    def raw_item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Returns (M, D) un-normalised output embeddings of item ids."""
        raise NotImplementedError

    def user_states(self, batch: Batch) -> torch.Tensor:
        """A contextual model's (B, L, D) user states before the request's context."""
        raise NotImplementedError(f"{type(self).__name__} is not a contextual model")

    def context_queries(self, states: torch.Tensor, context: Batch) -> torch.Tensor:
        """A contextual model's (T, D) queries from (T, D) user states and each request's
        context (labels, scenarios, query text, context items)."""
        raise NotImplementedError(f"{type(self).__name__} is not a contextual model")

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.similarity == "cosine" else x

    def check_ids(self, ids: torch.Tensor, field: str = "items") -> None:
        """Raises ConfigError naming ``field`` when an id lies outside 0..num_items (ids come
        from requests and data files, so a bad one is the caller's to fix)."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > self.num_items):
            bad = int(ids.max()) if int(ids.max()) > self.num_items else int(ids.min())
            raise ConfigError(field, f"item id {bad} is outside the vocabulary 1..{self.num_items}")

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns (B, L, D) queries: the user state after each position, ready to score."""
        self.check_ids(batch["items"])
        return self._finish(self.encode_positions(batch))

    def user_embedding(self, batch: Batch) -> torch.Tensor:
        """Returns (B, D) queries after each user's newest item (the serving user encoder)."""
        return self.forward(batch)[:, -1]

    def embed_items(self, ids: torch.Tensor) -> torch.Tensor:
        """Returns (M, D) item embeddings in the scoring space."""
        self.check_ids(ids, "item ids")
        return self._finish(self.raw_item_embeddings(ids))

    @torch.no_grad()
    def item_table(self, chunk: int = 65_536) -> torch.Tensor:
        """Returns (num_items + 1, D) embeddings of every item; row 0 (padding) is zero.

        Call it in eval mode: a tower with dropout gives noisy embeddings in training mode.
        """
        device = next(self.parameters()).device
        rows = []
        for start in range(0, self.num_items + 1, chunk):
            ids = torch.arange(start, min(start + chunk, self.num_items + 1), device=device)
            rows.append(self.embed_items(ids))
        table = torch.cat(rows)
        table[0] = 0
        return table
