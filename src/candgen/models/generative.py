"""Generative retrieval: a sequential transducer that writes the next item's semantic ID.

The user's items enter as the sum of their semantic-ID token embeddings (and their own id
embedding), so that an item never trained on still reads as its content; the transducer's last
state conditions a small decoder that gives the ID's tokens one at a time (TIGER's objective,
with a decoder-only transducer in place of T5). Retrieval is beam search over the IDs that
exist (``candgen.models.semantic_ids``): every candidate is a real item, or, with a subset's
trie, an eligible ad.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from candgen.data.tensors import Batch
from candgen.errors import ConfigError
from candgen.models.base import RetrievalModel
from candgen.models.semantic_ids import IdTrie, constrained_beam_search
from candgen.models.sequential import HSTU, BSARec, SASRec
from candgen.models.unified import UnifiedHSTU


def vocab_sizes_of(ids: torch.Tensor) -> tuple[int, ...]:
    """Tokens per position of an ID table: one more than the largest token used."""
    return tuple(int(v) + 1 for v in ids.amax(dim=0).tolist())


class SemanticItemEmbedding(nn.Module):
    """An item's input vector: its id embedding plus the embeddings of its ID's tokens.

    Args:
        ids: (num_items + 1, levels) each item's semantic ID (row 0, padding, is ignored).
        vocab_sizes: tokens per position of an ID.
        dim: embedding width.
    """

    def __init__(self, ids: torch.Tensor, vocab_sizes: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.register_buffer("semantic_ids", ids.to(torch.long))
        self.item = nn.Embedding(ids.shape[0], dim, padding_idx=0)
        self.tokens = nn.ModuleList(nn.Embedding(v, dim) for v in vocab_sizes)
        for table in (self.item, *self.tokens):
            nn.init.normal_(table.weight, std=1.0 / math.sqrt(dim))
        with torch.no_grad():
            self.item.weight[0].zero_()

    semantic_ids: torch.Tensor

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """(..., D) the vectors of ``items`` (zero at padding)."""
        codes = self.semantic_ids[items]
        out: torch.Tensor = self.item(items)
        for level, table in enumerate(self.tokens):
            out = out + table(codes[..., level])
        return out * (items > 0).unsqueeze(-1)


class IdDecoder(nn.Module):
    """The next token's logits given a user state and the tokens generated so far.

    Each position has its own head (a feed-forward layer 4x as wide, as a transformer's) over
    ``state + sum of the earlier tokens' embeddings``.

    Args:
        dim: state width.
        vocab_sizes: tokens per position.
        dropout: dropout inside each head.
    """

    def __init__(self, dim: int, vocab_sizes: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        self.tokens = nn.ModuleList(nn.Embedding(v, dim) for v in vocab_sizes[:-1])
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(dim),
                nn.Linear(dim, 4 * dim),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(4 * dim, v),
            )
            for v in vocab_sizes
        )

    def forward(self, states: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
        """(N, vocab_sizes[level]) logits of token ``level = prefixes.shape[1]``.

        Args:
            states: (N, D) user states.
            prefixes: (N, level) the tokens so far.
        """
        z = states
        for level in range(prefixes.shape[1]):
            z = z + self.tokens[level](prefixes[:, level])
        logits: torch.Tensor = self.heads[prefixes.shape[1]](z)
        return logits


class GenerativeRetriever(RetrievalModel):
    """A sequential transducer (SASRec, BSARec, HSTU or the unified model's HSTU) that
    generates the next item's semantic ID.

    Trained by teacher forcing (``id_loss``: the cross-entropy of each token of the target's
    ID); it retrieves by ``generate``. ``raw_item_embeddings`` gives the input vectors, so the
    model still has an item table, but its scores come from the decoder. With the unified
    model's transducer the state, and so the ID written, depends on the request (its label,
    surface, search query and context item), as the unified model's query does; an ad with text
    then enters as there, its content vector beside its semantic-ID embedding (which stands in
    for the id embedding: a cold ad's is left out, a warm ad's dropped with content_dropout).

    Args:
        encoder: the transducer that reads the sequence (built by ``build_model``); its item
            table is replaced by the semantic-ID embedding.
        semantic_ids: (num_items + 1, levels) each item's ID; row 0 is padding.
        vocab_sizes: tokens per position of an ID.
        dropout: dropout inside the decoder's heads.
        beam_width: beams kept per step when generating.
        dense_weight: above 0, the dense head trains beside the ID loss (with this weight, by
            the trainer), and the beam's candidates are ordered by it (``dense_order``).
        temperature: the dense loss's softmax temperature.
    """

    IDS_KEY = "encoder.item_emb.semantic_ids"  # where the state dict keeps the ID table

    def __init__(
        self,
        encoder: SASRec | BSARec | HSTU,
        semantic_ids: torch.Tensor,
        vocab_sizes: tuple[int, ...],
        dropout: float = 0.2,
        beam_width: int = 50,
        dense_weight: float = 0.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(encoder.num_items, "dot", temperature)
        if semantic_ids.shape[0] != encoder.num_items + 1:
            raise ConfigError(
                "semantic_ids",
                f"{semantic_ids.shape[0]} rows for {encoder.num_items} items (+ padding)",
            )
        encoder.item_emb = SemanticItemEmbedding(semantic_ids, vocab_sizes, encoder.dim)  # type: ignore[assignment]
        self.encoder = encoder
        self.contextual = encoder.contextual
        self.decoder = IdDecoder(encoder.dim, vocab_sizes, dropout)
        self.vocab_sizes = tuple(vocab_sizes)
        self.beam_width = beam_width
        self.dense_weight = dense_weight

    @property
    def semantic_ids(self) -> torch.Tensor:
        table = self.encoder.item_emb
        assert isinstance(table, SemanticItemEmbedding)
        return table.semantic_ids

    def encode_positions(self, batch: Batch) -> torch.Tensor:
        states: torch.Tensor = self.encoder.encode_positions(batch)
        return states

    def raw_item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.raw_item_embeddings(ids)

    def user_states(self, batch: Batch) -> torch.Tensor:
        return self.encoder.user_states(batch)

    def context_queries(self, states: torch.Tensor, context: Batch) -> torch.Tensor:
        # UnifiedHSTU.context_queries but for the finish: the encoder's would apply its own
        # similarity, while the decoder reads the state as the trainer gives it (``forward``:
        # this model's dot-product finish).
        if not isinstance(self.encoder, UnifiedHSTU):
            return super().context_queries(states, context)
        return self._finish(self.encoder.contextualise(states[:, None, :], context)[:, 0])

    def id_loss(
        self, states: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """The cross-entropy of each token of the targets' IDs (teacher forcing), summed over
        the tokens: averaged over the targets (``mean``) or one per target (``none``).

        Args:
            states: (N, D) the states that predict the targets.
            targets: (N,) item ids in 1..num_items.
            reduction: ``mean`` or ``none``.
        """
        codes = self.semantic_ids[targets]
        losses = [
            F.cross_entropy(
                self.decoder(states, codes[:, :level]), codes[:, level], reduction=reduction
            )
            for level in range(len(self.vocab_sizes))
        ]
        return torch.stack(losses).sum(0)

    def trie(self) -> IdTrie:
        """The IDs of every item (build it once for many ``generate`` calls)."""
        ids = self.semantic_ids[1:].cpu().numpy()
        return IdTrie(ids, np.arange(1, self.num_items + 1), self.vocab_sizes)

    @torch.no_grad()
    def generate(
        self, states: torch.Tensor, k: int, trie: IdTrie | None = None, beam_width: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """(len(states), k) the items whose IDs the decoder finds most likely, best first, and
        their log-probabilities (call in eval mode). Where the model has a dense head
        (``dense_weight``), callers order them by it with ``dense_order``.

        Args:
            states: (Q, D) user states (``user_embedding``).
            k: items per state.
            trie: the IDs that may be generated, naming items by their row here (default:
                every item's).
            beam_width: beams kept per step (default: the model's; at least ``k``).
        """

        def step(rows: np.ndarray, prefixes: np.ndarray) -> np.ndarray:
            logits = self.decoder(
                states[torch.from_numpy(rows).to(states.device)],
                torch.from_numpy(prefixes).to(states.device),
            )
            return F.log_softmax(logits.float(), dim=-1).cpu().numpy()

        width = max(beam_width or self.beam_width, k)
        return constrained_beam_search(step, trie or self.trie(), len(states), width, k)

    @torch.no_grad()
    def dense_order(self, states: torch.Tensor, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``items`` (Q, k item rows; -1: none) ordered by each state's dense score (the dot
        product with the items' embeddings, as the dense loss trains it), with
        it (-inf for none): LIGER's hybrid, the search chooses the candidates and the dense head
        ranks them."""
        found = torch.from_numpy(np.maximum(items, 0)).to(states.device)
        vectors = self.embed_items(found)
        dense = (vectors * states[:, None, :]).sum(-1).float().cpu().numpy()
        dense[items < 0] = -np.inf
        order = np.argsort(-dense, axis=1, kind="stable")
        return np.take_along_axis(items, order, 1), np.take_along_axis(dense, order, 1)
