"""One retrieval model for every label and surface of an ads marketplace.

A shared HSTU encoder reads the user's history; a scenario-adaptive layer (a gated mixture of
experts whose gate sees the surface of the request) conditions the user state on where the
user is; label-specific query heads then turn it into a query for organic engagement, ad click
or attributed conversion. All heads score one shared item space, so one ANN index serves them.
Trained with weighted multi-task sampled softmax: each next-item target trains the head of its
own label, weighted by ``TrainConfig.label_weights``.

Cold start: where ads carry a text embedding (all-MiniLM-L6-v2 of title and description), an ad
content tower maps it into the same item space, and an ad's vector is its id embedding plus its
content vector. An ad with no training interaction has an id embedding that never trained, so it
is represented by its content vector alone; in training, each warm ad's id embedding is dropped
with probability ``content_dropout`` (as in DropoutNet), so the content vector alone must place
an ad where its engagement would. New ads are then retrievable from their text on day one.
"""

from __future__ import annotations

from typing import Unpack

import torch
from torch import nn

from candgen.data.tensors import Batch
from candgen.errors import ConfigError
from candgen.models.sequential import HSTU, HSTUArgs


class ScenarioMixture(nn.Module):
    """A residual gated mixture of experts conditioned on the request's context: its surface
    (``scenario``, an embedding per surface) plus whatever the caller adds to that vector (the
    query's text, the item being viewed).

    Args:
        dim: width of the user state.
        num_scenarios: scenario codes 0..num_scenarios-1 (0 = unknown).
        num_experts: linear experts shared by all scenarios.

    Returns (forward):
        (B, L, D) adapted states.
    """

    def __init__(self, dim: int, num_scenarios: int, num_experts: int) -> None:
        super().__init__()
        # The scenario embedding and the experts start at zero, so the mixture starts as the
        # identity: the model begins as the plain HSTU it extends (on a set with no surfaces,
        # such as Amazon Beauty, a random constant added to every query cost HR@10).
        self.scenario = nn.Embedding(num_scenarios, dim)
        nn.init.zeros_(self.scenario.weight)
        self.gate = nn.Linear(2 * dim, num_experts)
        self.experts = nn.Parameter(torch.zeros(num_experts, dim, dim))
        self.num_scenarios = num_scenarios

    def gates(self, state: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """(B, L, E) softmax weights of the experts for each position, given (B, L, D) context
        vectors."""
        return torch.softmax(self.gate(torch.cat([state, context], dim=-1)), dim=-1)

    def forward(self, state: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        outputs = torch.einsum("bld,edf->blef", state, self.experts)
        mixed = (self.gates(state, context).unsqueeze(-1) * outputs).sum(dim=-2)
        adapted: torch.Tensor = state + mixed + context
        return adapted


class ContentTower(nn.Module):
    """Maps ad text embeddings into the behavioural item space.

    Args:
        text_dim: width of the text embedding (384 for all-MiniLM-L6-v2).
        dim: width of the item space.
        dropout: dropout rate inside the tower.

    Returns (forward):
        (..., dim) content vectors, on the scale of the id embeddings.
    """

    def __init__(self, text_dim: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(text_dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
        )

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        vectors: torch.Tensor = self.net(text)
        return vectors


class UnifiedHSTU(HSTU):
    """HSTU with a scenario-adaptive mixture and one query head per label.

    Reads ``batch["scenarios"]`` ((B, L) or (B,) surface codes, 0 = unknown; default 0),
    ``batch["labels"]`` ((B, L) or (B,) label codes into ``LABELS``; default ``serve_label``),
    and the request's context where the model reads it: ``batch["query_text"]`` ((B, L, T) or
    (B, T) text embeddings of the search query, zero rows where none) and
    ``batch["context_items"]`` ((B, L) or (B,) ids of the item being viewed, 0 where none).

    Where there is one label, there are no heads; where there is one scenario (the unknown
    one), there is no mixture: on data without labels or surfaces (Amazon Beauty) the model is
    the HSTU it extends, parameter for parameter.

    Args:
        num_items: catalogue size (ids 1..num_items, 0 = padding).
        num_labels: query heads (organic, click, conversion); 1: none.
        num_scenarios: scenario codes, unknown included; 1: no scenario mixture.
        num_experts: experts of the scenario mixture.
        serve_label: the head used when a batch names no label (what serving asks for).
        scenario_adaptive: condition on the scenario; False treats every request as an unknown
            surface (the ablation without scenario adaptation).
        item_text: (num_items + 1, T) text embeddings, zero rows where an item has none; with
            any non-zero row the model gets an ad content tower (cold start).
        cold_items: (num_items + 1,) True where an item had no training interaction: its vector
            is its content vector alone (only items with text are affected).
        content_dropout: in training, the probability of dropping a warm ad's id embedding (in a
            generative model, its semantic-ID embedding, which stands in for it).
        long_term_dim: width of the long-term embedding (``batch["long_term"]``: (B, L, T) per
            position or (B, T) per user; absent or zero rows: none yet) fused into the state by
            a linear projection; 0: the model reads none.
        short_term: read the recent sequence with the HSTU encoder; False leaves only the
            long-term embedding and the surface (needs long_term_dim).
        long_term_dropout: in training, the probability of hiding a sequence's long-term
            embedding, so the model does not lean on a summary fitted on the same days.
        query_text_dim: width of the query text embedding read through a query tower into the
            mixture's context (0: the model reads no query).
        context_items: read the context item (its id embedding, projected) into the
            mixture's context.
        context_dropout: in training, the probability of hiding a position's query or context
            item, so the model also answers a request that comes without one.
        **hstu: the HSTU encoder's arguments (dim, max_len, num_blocks, ...).
    """

    contextual = True
    # Buffers, registered only where some item has text (then ``content`` is set too).
    item_text: torch.Tensor
    has_text: torch.Tensor
    cold_items: torch.Tensor

    def __init__(
        self,
        num_items: int,
        num_labels: int = 3,
        num_scenarios: int = 4,
        num_experts: int = 4,
        serve_label: int = 1,
        scenario_adaptive: bool = True,
        item_text: torch.Tensor | None = None,
        cold_items: torch.Tensor | None = None,
        content_dropout: float = 0.5,
        long_term_dim: int = 0,
        short_term: bool = True,
        long_term_dropout: float = 0.0,
        query_text_dim: int = 0,
        context_items: bool = False,
        context_dropout: float = 0.0,
        **hstu: Unpack[HSTUArgs],
    ) -> None:
        super().__init__(num_items, **hstu)
        dim = self.dim
        if not 0 <= serve_label < num_labels:
            raise ConfigError("serve_label", f"{serve_label} is not a head in 0..{num_labels - 1}")
        for name, rate in (
            ("content_dropout", content_dropout),
            ("long_term_dropout", long_term_dropout),
            ("context_dropout", context_dropout),
        ):
            if not 0.0 <= rate < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {rate}")
        self.long_term_dropout = long_term_dropout
        self.num_labels, self.num_scenarios = num_labels, num_scenarios
        self.mixture = (
            ScenarioMixture(dim, num_scenarios, num_experts) if num_scenarios > 1 else None
        )
        # The request's context enters through the mixture, so only a model with one reads it.
        if (query_text_dim > 0 or context_items) and self.mixture is None:
            raise ConfigError("context", "the request's context needs surfaces (a mixture)")
        self.query_tower = (
            ContentTower(query_text_dim, dim, float(hstu.get("dropout", 0.2)))
            if query_text_dim > 0
            else None
        )
        self.context_item = nn.Linear(dim, dim) if context_items else None
        self.context_dropout = context_dropout
        # Each head starts as the identity, so at first every label asks the same query.
        self.heads = (
            nn.Parameter(torch.eye(dim).repeat(num_labels, 1, 1)) if num_labels > 1 else None
        )
        self.serve_label = serve_label
        self.scenario_adaptive = scenario_adaptive
        self.content_dropout = content_dropout
        if not short_term and long_term_dim <= 0:
            raise ConfigError(
                "short_term",
                "without the short-term sequence the model needs a long-term embedding "
                "(long_term_dim > 0)",
            )
        self.short_term = short_term
        if not short_term:
            # Without the sequence, the encoder's own parameters would never get a gradient
            # (which also stalls DDP's reduction): only the item table stays.
            self.blocks = nn.ModuleList()
            self.pos_emb = None  # type: ignore[assignment]
            self.ln = None  # type: ignore[assignment]
        # Created only where there are long-term embeddings, as the content tower below.
        self.long_term = nn.Linear(long_term_dim, dim) if long_term_dim > 0 else None
        self.content: ContentTower | None = None
        has_text = None if item_text is None else item_text.abs().sum(-1) > 0
        # Built only where some item has text, so a set without text (Amazon Beauty) gets
        # exactly the model it got before the tower existed.
        if has_text is not None and bool(has_text.any()):
            assert item_text is not None
            if item_text.shape[0] != num_items + 1:
                raise ConfigError(
                    "item_text", f"{item_text.shape[0]} rows, expected {num_items + 1}"
                )
            # on the text's device: load_model builds the model on the meta device
            cold = torch.zeros(num_items + 1, dtype=torch.bool, device=item_text.device)
            if cold_items is not None:
                if cold_items.shape != cold.shape:
                    raise ConfigError(
                        "cold_items",
                        f"shape {tuple(cold_items.shape)}, expected {tuple(cold.shape)}",
                    )
                cold = cold_items.bool()
            self.register_buffer("item_text", item_text.float(), persistent=True)
            self.register_buffer("has_text", has_text, persistent=True)
            self.register_buffer("cold_items", cold & has_text, persistent=True)
            self.content = ContentTower(item_text.shape[1], dim, float(hstu.get("dropout", 0.2)))

    @property
    def _device(self) -> torch.device:
        # Not the item table's: in a generative model that is a semantic-ID embedding.
        return next(self.parameters()).device

    def _item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        vectors: torch.Tensor = self.item_emb(ids)
        if self.content is None:
            return vectors
        keep = ~self.cold_items[ids]
        if self.training and self.content_dropout > 0:
            keep = keep & (torch.rand(ids.shape, device=ids.device) >= self.content_dropout)
        with_text = vectors * keep.unsqueeze(-1) + self.content(self.item_text[ids])
        return torch.where(self.has_text[ids].unsqueeze(-1), with_text, vectors)

    def content_vectors(self, text: torch.Tensor) -> torch.Tensor:
        """(M, D) item-space vectors of ads known only by their text (new ads), normalised as
        ``embed_items`` normalises; what a new ad's row in the index is."""
        if self.content is None:
            raise ConfigError(
                "item_text", "this model was trained without ad text (no content tower)"
            )
        return self._finish(self.content(text.float()))

    def _codes(
        self, batch: Batch, key: str, shape: torch.Size, default: int, high: int
    ) -> torch.Tensor:
        device = self._device
        codes = batch.get(key)
        if codes is None:
            return torch.full(tuple(shape), default, dtype=torch.long, device=device)
        codes = self._per_position(codes.long(), shape, 0)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= high):
            raise ConfigError(key, f"codes must lie in 0..{high - 1}")
        return codes

    @staticmethod
    def _per_position(values: torch.Tensor, shape: torch.Size, width: int) -> torch.Tensor:
        """(B, L, ...) values given per position or, with one dimension fewer, per request
        (``width``: the dimensions of one value, 1 for a text embedding, 0 for an id)."""
        if values.dim() == 1 + width:
            values = values.unsqueeze(1).expand(shape[0], shape[1], *values.shape[1:])
        return values

    def _hidden(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """(B, L, 1) 0 where training hides a position's context, else 1."""
        if not (self.training and self.context_dropout > 0):
            return torch.ones(*shape, 1, device=device)
        return (torch.rand(*shape, 1, device=device) >= self.context_dropout).float()

    def _request_context(self, batch: Batch, shape: torch.Size) -> torch.Tensor | float:
        """(B, L, D) what the request's query text and context item add to its surface's
        context vector (0 where the model reads neither or the batch has neither)."""
        device = self._device
        extra: torch.Tensor | float = 0.0
        text = batch.get("query_text")
        if self.query_tower is not None and text is not None:
            text = self._per_position(text.float(), shape, 1)
            given = (text.abs().sum(-1, keepdim=True) > 0).float()
            extra = extra + self.query_tower(text) * given * self._hidden(shape, device)
        viewed = batch.get("context_items")
        if self.context_item is not None and viewed is not None:
            viewed = self._per_position(viewed.long(), shape, 0)
            self.check_ids(viewed, "context_items")
            given = (viewed > 0).unsqueeze(-1).float()
            vectors = self.context_item(self.item_emb(viewed))
            extra = extra + vectors * given * self._hidden(shape, device)
        return extra

    def user_states(self, batch: Batch) -> torch.Tensor:
        """(B, L, D) the user state after each position, before the request's context: the
        encoded sequence plus the long-term embedding."""
        items = batch["items"]
        if self.short_term:
            state = super().encode_positions(batch)
        else:
            state = torch.zeros(*items.shape, self.dim, device=items.device)
        long_term = batch.get("long_term")
        if self.long_term is not None and long_term is not None:
            if long_term.dim() == 2:
                long_term = long_term[:, None, :].expand(*items.shape, long_term.shape[-1])
            long_term = long_term.float()
            if self.training and self.long_term_dropout > 0:
                hidden = torch.rand(items.shape[0], 1, 1, device=items.device)
                long_term = long_term * (hidden >= self.long_term_dropout)
            state = state + self.long_term(long_term)
        return state

    def contextualise(self, state: torch.Tensor, context: Batch) -> torch.Tensor:
        """(B, L, D) queries from user states and each request's context (``context``'s
        ``scenarios``, ``labels``, ``query_text``, ``context_items``, per request or per
        position; absent: unknown surface, the serving label, no query, no context item)."""
        shape = state.shape[:2]
        scenarios = self._codes(context, "scenarios", shape, 0, self.num_scenarios)
        if not self.scenario_adaptive:
            scenarios = torch.zeros_like(scenarios)
        labels = self._codes(context, "labels", shape, self.serve_label, self.num_labels)
        adapted = state
        if self.mixture is not None:
            vectors = self.mixture.scenario(scenarios) + self._request_context(context, shape)
            adapted = self.mixture(state, vectors)
        if self.heads is None:
            return adapted
        every_head = torch.einsum("bld,hde->blhe", adapted, self.heads)
        index = labels[..., None, None].expand(*labels.shape, 1, every_head.shape[-1])
        return every_head.gather(2, index).squeeze(2)

    def encode_positions(self, batch: Batch) -> torch.Tensor:
        return self.contextualise(self.user_states(batch), batch)

    def context_queries(self, states: torch.Tensor, context: Batch) -> torch.Tensor:
        """(T, D) scoring queries for T requests from (T, D) user states (``user_states`` at
        each user's newest position) and each request's context (see ``contextualise``)."""
        return self._finish(self.contextualise(states[:, None, :], context)[:, 0])
