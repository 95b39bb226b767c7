"""A retrieval model's architecture settings: what ``build_model`` needs to rebuild it.

Models own these; ``candgen.training.config.TrainConfig`` adds how to train. Every field is also a
`candgen train` flag and a pipeline parameter of the same name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from candgen.errors import ConfigError
from candgen.vocab import LABELS

MODELS = ("sasrec", "bsarec", "hstu", "two_tower", "unified", "generative")
BACKBONES = ("sasrec", "bsarec", "hstu", "unified")
DEFAULT_TEMPERATURE = {
    "sasrec": 1.0,
    "bsarec": 1.0,
    "hstu": 0.05,
    "two_tower": 0.05,
    "unified": 0.05,
    "generative": 1.0,
}


@dataclass(frozen=True)
class ModelConfig:
    """Which retrieval model, and its shape. What says "unified only" also applies to a
    generative model on the unified backbone.

    Attributes:
        model: sasrec, bsarec (SASRec's attention beside a frequency filter; trains on
            prefix examples), hstu, two_tower, unified (HSTU with a scenario-adaptive mixture and
            one query head per label, trained multi-task) or generative (a transducer that
            writes the next item's semantic ID; retrieval by beam search).
        dim: embedding width.
        num_blocks: attention blocks (sequential models).
        num_heads: attention heads; must divide dim.
        dropout: dropout rate.
        max_len: the longest history the model reads.
        temperature: softmax temperature; 0 means the model's default (SASRec 1.0, others 0.05).
        num_experts: unified only: experts of the scenario mixture.
        serve_label: unified only: the head serving asks for; empty means click where the data
            has ad labels, else organic.
        scenario_adaptive: unified only: condition the query on the request's surface (off for
            the ablation: every request looks like an unknown surface).
        content_dropout: unified only, where ads have text: the probability that a training
            step drops a warm ad's id embedding, so its text alone must place it (as a new ad's
            text must).
        time_bias: let HSTU read timestamps (its time-gap bias) where the data has them; off
            for the long-term summariser, whose input sequence (user_long_term) has none.
        long_term: unified only: fuse the user's long-term embedding (the
            user_long_term_embedding table in features_dir) into the query where it has rows.
        short_term: unified only: read the recent engagement sequence; off leaves only the
            long-term embedding and the surface (the ablation without short-term features).
        long_term_dropout: unified only: the probability that a training sequence's long-term
            embedding is hidden, so the model does not lean on a summary that was fitted on the
            same days it trains on.
        context: unified only: condition the query on the request's context where the data
            logs one: the search query's text (through a query tower over its MiniLM
            embedding) and the item a related-items request is about.
        context_dropout: unified only: the probability that a training position's query or
            context item is hidden, so the model also answers requests that come without one.
        frequency_cutoff: bsarec only: the low-pass keeps frequency_cutoff // 2 + 1
            frequencies of the window (BSARec's c).
        frequency_weight: bsarec only: the filter's share of each layer against attention's
            (BSARec's alpha).
        backbone: generative only: the transducer that reads the sequence (sasrec, bsarec,
            hstu, or unified: the unified model's, whose state, and so the ID written, depends
            on the request's label, surface and context; the unified-only settings apply).
        beam_width: generative only: beams kept per step of the ID search (at least the
            number of items asked for).
        dense_weight: generative only: the weight of a dense next-item loss (the full softmax
            over the item table the transducer reads) beside the ID loss; above 0, the beam's
            candidates are also ordered by that dense score (LIGER's hybrid: the search
            chooses the candidates, the dense head ranks them). The loss is a softmax over
            every item each step: sized for catalogues of up to some hundred thousand items.
    """

    model: str = "sasrec"
    dim: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    max_len: int = 50
    temperature: float = 0.0
    num_experts: int = 4
    serve_label: str = ""
    scenario_adaptive: bool = True
    content_dropout: float = 0.5
    time_bias: bool = True
    long_term: bool = True
    short_term: bool = True
    long_term_dropout: float = 0.0
    context: bool = True
    context_dropout: float = 0.1
    frequency_cutoff: int = 5
    frequency_weight: float = 0.7
    backbone: str = "sasrec"
    beam_width: int = 50
    dense_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError("model", f"{self.model!r} is not one of {MODELS}")
        for name in ("dim", "num_blocks", "num_heads", "max_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if self.backbone not in BACKBONES:
            raise ConfigError("backbone", f"{self.backbone!r} is not one of {BACKBONES}")
        if self.frequency_cutoff < 1:
            raise ConfigError("frequency_cutoff", f"must be >= 1, got {self.frequency_cutoff}")
        if not 0.0 <= self.frequency_weight <= 1.0:
            raise ConfigError("frequency_weight", f"must be in [0, 1], got {self.frequency_weight}")
        if self.beam_width < 1:
            raise ConfigError("beam_width", f"must be >= 1, got {self.beam_width}")
        if self.dense_weight < 0:
            raise ConfigError("dense_weight", f"must be >= 0, got {self.dense_weight}")
        if self.dense_weight and self.model != "generative":
            raise ConfigError("dense_weight", "only the generative model has a dense head to add")
        if self.temperature < 0:
            raise ConfigError("temperature", f"must be >= 0, got {self.temperature}")
        if self.num_experts < 1:
            raise ConfigError("num_experts", f"must be >= 1, got {self.num_experts}")
        if self.serve_label not in ("", *LABELS):
            raise ConfigError(
                "serve_label", f"{self.serve_label!r} is not one of {LABELS} (or empty)"
            )
        if self.dim % self.num_heads:
            raise ConfigError("num_heads", f"{self.num_heads} does not divide dim {self.dim}")
        for name in ("dropout", "content_dropout", "long_term_dropout", "context_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if not self.short_term and not (self.encoder == "unified" and self.long_term):
            raise ConfigError(
                "short_term",
                "only the unified model with long_term can leave out the short-term sequence",
            )

    @property
    def encoder(self) -> str:
        """The model that reads the history: the model itself, or a generative model's
        backbone (whose settings then apply as they would to that model)."""
        return self.backbone if self.model == "generative" else self.model

    @property
    def effective_temperature(self) -> float:
        return self.temperature or DEFAULT_TEMPERATURE[self.model]

    def model_fields(self) -> dict[str, Any]:
        """This config's own fields (what fixes the model's shape; a subclass's other fields
        left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)}

    def model_config(self) -> ModelConfig:
        """The model settings alone (a config that extends them gives just these)."""
        return self if type(self) is ModelConfig else ModelConfig(**self.model_fields())
