"""Building a model from its settings, and loading a saved ``model.pt``.

Light on purpose (torch and the model classes only): the serving runtime, which has no pandas or
Feast, loads models through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import torch

from candgen.errors import CandgenError, ConfigError
from candgen.models.base import RetrievalModel
from candgen.models.config import ModelConfig
from candgen.models.generative import GenerativeRetriever, vocab_sizes_of
from candgen.models.saved import LoadedModel, read_header
from candgen.models.sequential import HSTU, BSARec, SASRec
from candgen.models.two_tower import TwoTower
from candgen.models.unified import UnifiedHSTU
from candgen.vocab import LABELS, NUM_SCENARIOS


class _CommonArgs(TypedDict):
    """The arguments every model class takes."""

    num_items: int
    dim: int
    max_len: int
    dropout: float
    temperature: float


def build_model(
    config: ModelConfig,
    num_items: int,
    item_attributes: torch.Tensor,
    item_text: torch.Tensor | None = None,
    user_feature_cardinalities: tuple[int, ...] = (),
    has_timestamps: bool = False,
    has_labels: bool = False,
    cold_items: torch.Tensor | None = None,
    long_term_dim: int = 0,
    has_surfaces: bool = True,
    query_text_dim: int = 0,
    has_context_items: bool = False,
    semantic_ids: torch.Tensor | None = None,
) -> RetrievalModel:
    """The model a config names, sized for the data.

    ``cold_items`` marks the items with no training interaction; the unified model represents
    those that have text by their content vector alone. ``long_term_dim`` is the width of the
    long-term embedding the unified model fuses (0: none); ``query_text_dim`` (0: none) and
    ``has_context_items`` say which request context the data logs, which the unified model
    reads unless ``config.context`` is off.

    HSTU gets its time bias only where the data has timestamps: a parameter that never receives
    a gradient would stall DDP's gradient reduction. The unified model serves the click head
    where the data has ad labels, else the organic one, unless ``serve_label`` says otherwise;
    it has label heads only where the data has labels and a scenario mixture only where it has
    surfaces (without either it is HSTU). The generative model needs ``semantic_ids``, each
    item's ID ((num_items + 1, levels) with row 0 for padding); its transducer is the model its
    ``backbone`` names, built as that model would be.
    """
    if config.model == "generative" and semantic_ids is None:
        raise ConfigError("semantic_ids", "the generative model needs the items' semantic IDs")
    model = _dense_model(
        config.encoder,
        config,
        num_items,
        item_attributes,
        item_text=item_text,
        user_feature_cardinalities=user_feature_cardinalities,
        has_timestamps=has_timestamps,
        has_labels=has_labels,
        cold_items=cold_items,
        long_term_dim=long_term_dim,
        has_surfaces=has_surfaces,
        query_text_dim=query_text_dim,
        has_context_items=has_context_items,
    )
    if config.model != "generative":
        return model
    assert semantic_ids is not None and isinstance(model, SASRec | BSARec | HSTU)
    return GenerativeRetriever(
        model,
        semantic_ids,
        vocab_sizes_of(semantic_ids),
        dropout=config.dropout,
        beam_width=config.beam_width,
        dense_weight=config.dense_weight,
        temperature=config.effective_temperature,
    )


def _dense_model(
    name: str,
    config: ModelConfig,
    num_items: int,
    item_attributes: torch.Tensor,
    *,
    item_text: torch.Tensor | None,
    user_feature_cardinalities: tuple[int, ...],
    has_timestamps: bool,
    has_labels: bool,
    cold_items: torch.Tensor | None,
    long_term_dim: int,
    has_surfaces: bool,
    query_text_dim: int,
    has_context_items: bool,
) -> RetrievalModel:
    """The sequence or two-tower model called ``name`` (the config's model, or a generative
    model's backbone) with the config's settings, as ``build_model`` describes."""
    common: _CommonArgs = {
        "num_items": num_items,
        "dim": config.dim,
        "max_len": config.max_len,
        "dropout": config.dropout,
        "temperature": config.effective_temperature,
    }
    time_buckets = 64 if has_timestamps and config.time_bias else 0
    if name == "sasrec":
        return SASRec(num_blocks=config.num_blocks, num_heads=config.num_heads, **common)
    if name == "bsarec":
        return BSARec(
            num_blocks=config.num_blocks,
            num_heads=config.num_heads,
            cutoff=config.frequency_cutoff,
            weight=config.frequency_weight,
            **common,
        )
    if name == "hstu":
        return HSTU(
            num_blocks=config.num_blocks,
            num_heads=config.num_heads,
            time_buckets=time_buckets,
            **common,
        )
    if name == "unified":
        serve = config.serve_label or ("click" if has_labels else "organic")
        return UnifiedHSTU(
            num_labels=len(LABELS) if has_labels else 1,
            num_scenarios=NUM_SCENARIOS if has_surfaces else 1,
            num_experts=config.num_experts,
            serve_label=LABELS.index(serve),
            scenario_adaptive=config.scenario_adaptive,
            item_text=item_text,
            cold_items=cold_items,
            content_dropout=config.content_dropout,
            long_term_dim=long_term_dim,
            short_term=config.short_term,
            long_term_dropout=config.long_term_dropout,
            query_text_dim=query_text_dim if config.context and has_surfaces else 0,
            context_items=has_context_items and config.context and has_surfaces,
            context_dropout=config.context_dropout,
            num_blocks=config.num_blocks,
            num_heads=config.num_heads,
            time_buckets=time_buckets,
            **common,
        )
    return TwoTower(
        item_attributes=item_attributes,
        user_feature_cardinalities=user_feature_cardinalities,
        item_text=item_text,
        **common,
    )


def load_model(path: Path | str, map_location: str = "cpu") -> LoadedModel:
    """Loads a ``model.pt`` written by ``train``: the model (eval mode) and its header.

    Raises:
        CandgenError: the file is missing, foreign, of another format version or damaged, or
            it leaves a tensor of the model without a value.
    """
    header, state = read_header(path, map_location)
    n = header.num_items
    attributes = state.get("item_attributes")
    if attributes is None:  # made only when missing: 80 MB at 10M items
        attributes = torch.zeros(n + 1, 1, dtype=torch.long)
    # Built on the meta device (shapes, no memory), then given the saved tensors themselves,
    # memory-mapped by read_header, not copies: the process holds only the pages it reads. A
    # model built in memory first held its own 2.6 GB item table at 10M ads until the assignment
    # (serving_notes.md, 16 and 17).
    with torch.device("meta"):
        model = build_model(
            header.model,
            n,
            attributes,
            # read: whether any item has text shapes the model (a generative model's transducer
            # keeps the text as the unified model does, under ``encoder.``)
            state.get("item_text", state.get("encoder.item_text")),
            header.user_feature_cardinalities,
            header.has_timestamps,
            header.has_labels,
            None,  # the cold-item mask is part of the state
            header.long_term_dim,
            header.has_surfaces,
            header.query_text_dim,
            header.has_context_items,
            state.get(GenerativeRetriever.IDS_KEY),
        )
    model.load_state_dict(state, assign=True)
    unset = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if unset:
        raise CandgenError(f"{path}: the saved model has no values for {unset[:5]}")
    model.eval()
    return LoadedModel(model, header)
