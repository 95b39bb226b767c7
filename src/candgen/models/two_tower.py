"""The two-tower baseline: a user tower and an item/ad tower meeting in one cosine space."""

from __future__ import annotations

import math

import torch
from torch import nn

from candgen.data.tensors import Batch
from candgen.errors import ConfigError
from candgen.models.base import RetrievalModel


def _mlp(d_in: int, dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
    )


class TwoTower(RetrievalModel):
    """Two-tower retrieval model.

    User tower: embeddings of the user's categorical features plus the mean of the item-tower
    id embeddings of their history so far (a causal running mean, so every position of a training
    sequence gives one example), through an MLP. Item/ad tower: id embedding plus the mean of its
    attribute embeddings (category, brand, advertiser...) plus a projection of its text embedding
    when it has one, through an MLP. Both outputs are L2-normalised.

    Args:
        num_items: catalogue size (ids 1..num_items, 0 = padding).
        item_attributes: (num_items + 1, A) int64 attribute ids per item, 0-padded.
        user_feature_cardinalities: one vocabulary size per user feature column (0 = unknown).
        item_text: (num_items + 1, T) float text embeddings, or None; rows of zeros mean "none".
        dim: embedding width.
        max_len: longest history the user tower reads.
        dropout: dropout rate.
        temperature: softmax temperature.
    """

    item_attributes: torch.Tensor  # buffers (register_buffer), found by nn.Module's lookup
    item_text: torch.Tensor

    def __init__(
        self,
        num_items: int,
        item_attributes: torch.Tensor,
        user_feature_cardinalities: tuple[int, ...] = (),
        item_text: torch.Tensor | None = None,
        dim: int = 64,
        max_len: int = 50,
        dropout: float = 0.1,
        temperature: float = 0.05,
    ) -> None:
        super().__init__(num_items, "cosine", temperature)
        if item_attributes.shape[0] != num_items + 1:
            raise ConfigError(
                "item_attributes", f"{item_attributes.shape[0]} rows, expected {num_items + 1}"
            )
        self.dim = dim
        self.max_len = max_len
        self.register_buffer("item_attributes", item_attributes.long(), persistent=True)
        self.item_id_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.attr_emb = nn.Embedding(int(item_attributes.max().item()) + 1, dim, padding_idx=0)
        for emb in (self.item_id_emb, self.attr_emb):
            nn.init.normal_(emb.weight, std=1.0 / math.sqrt(dim))
        text_dim = 0 if item_text is None else item_text.shape[1]
        self.register_buffer(
            "item_text",
            item_text.float() if item_text is not None else torch.zeros(num_items + 1, 0),
            persistent=True,
        )
        self.text_proj = nn.Linear(text_dim, dim) if text_dim else None
        self.item_mlp = _mlp(dim, dim, dropout)
        self.user_feature_embs = nn.ModuleList(
            nn.Embedding(card + 1, dim) for card in user_feature_cardinalities
        )
        self.history_proj = nn.Linear(dim, dim)
        self.user_mlp = _mlp(dim * (1 + len(user_feature_cardinalities)), dim, dropout)

    def _item_input(self, ids: torch.Tensor) -> torch.Tensor:
        attrs = self.item_attributes[ids]
        attr_mask = (attrs > 0).unsqueeze(-1).float()
        attr = (self.attr_emb(attrs) * attr_mask).sum(-2) / attr_mask.sum(-2).clamp(min=1.0)
        x: torch.Tensor = self.item_id_emb(ids) + attr
        if self.text_proj is not None:
            x = x + self.text_proj(self.item_text[ids])
        return x

    def raw_item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        vectors: torch.Tensor = self.item_mlp(self._item_input(ids))
        return vectors

    def encode_positions(self, batch: Batch) -> torch.Tensor:
        items = batch["items"]
        if items.shape[1] > self.max_len:
            raise ConfigError("items", f"sequence length {items.shape[1]} > max_len {self.max_len}")
        mask = (items > 0).unsqueeze(-1).float()
        hist = self._item_input(items) * mask
        running_mean = hist.cumsum(1) / mask.cumsum(1).clamp(min=1.0)
        parts = [self.history_proj(running_mean)]
        if self.user_feature_embs:
            feats = batch["user_features"]
            for col, emb in enumerate(self.user_feature_embs):
                parts.append(emb(feats[:, col]).unsqueeze(1).expand_as(parts[0]))
        states: torch.Tensor = self.user_mlp(torch.cat(parts, dim=-1))
        return states
