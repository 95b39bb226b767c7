"""The file a trained model is kept in (``model.pt``): a typed, versioned header, the item ids and
the weights. Written by the trainer, read here and nowhere else.

Light on purpose (torch and numpy): the Triton runtime loads models through it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from candgen.data.config import DataConfig
from candgen.errors import CandgenError
from candgen.models.base import RetrievalModel
from candgen.models.config import ModelConfig
from candgen.paths import replace_atomically

FORMAT = "candgen.model"
# 2: the typed header (ModelConfig, DataConfig, the data's shape). 1 (no "format" key) was a flat
# dict holding the whole training config.
VERSION = 2


@dataclass(frozen=True)
class ModelHeader:
    """What a ``model.pt`` holds, besides the weights.

    Attributes:
        model: the architecture (what ``build_model`` needs).
        data: the data set it was trained and evaluated on.
        item_ids: (N + 1,) external id of each internal item id (row 0 is padding).
        user_feature_cardinalities: the two-tower's user feature vocabularies.
        has_timestamps, has_labels, has_surfaces: what the training data had (they fix which
            parts the model was built with).
        long_term_dim: the width of the long-term embedding the model fuses (0: none).
        query_text_dim: the width of the query text embedding the model reads (0: none).
        has_context_items: the model reads the request's context item.
        train_cutoff: where the data was split by time (ISO time; empty where it was not).
        long_term_summariser: the summariser whose summaries the model read (empty: none).
        snapshot: a hash of the training data, for lineage.
        feature_service: the Feast feature services the data used, if any.
        best_epoch: the epoch whose weights these are.
        seed: the training seed (the sampled protocol's negatives are drawn with it).
        protocol: the evaluation protocol it was selected with (full or sampled100).
        primary_metric: the metric that picked its epoch and gates its promotion.
        training: the whole training config as a dict, for lineage only.
    """

    model: ModelConfig
    data: DataConfig
    item_ids: np.ndarray
    user_feature_cardinalities: tuple[int, ...] = ()
    has_timestamps: bool = False
    has_labels: bool = False
    has_surfaces: bool = True
    long_term_dim: int = 0
    query_text_dim: int = 0
    has_context_items: bool = False
    train_cutoff: str = ""
    long_term_summariser: str = ""
    snapshot: str = ""
    feature_service: str | None = None
    best_epoch: int = 0
    seed: int = 0
    protocol: str = "full"
    primary_metric: str = "ndcg@10"
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["model"] = self.model.model_fields()
        out["data"] = self.data.data_fields()
        out["user_feature_cardinalities"] = list(self.user_feature_cardinalities)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelHeader:
        values = dict(values)
        values["model"] = ModelConfig(**values["model"])
        values["data"] = DataConfig(**values["data"])
        values["item_ids"] = np.asarray(values["item_ids"], dtype=np.int64)
        values["user_feature_cardinalities"] = tuple(values["user_feature_cardinalities"])
        return cls(**values)


class LoadedModel(NamedTuple):
    """A model read back from its file (eval mode), and its header."""

    model: RetrievalModel
    header: ModelHeader


def save_model(path: Path, model: RetrievalModel, header: ModelHeader) -> None:
    """Writes ``model.pt`` (atomically: a reader never sees half a file)."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "header": header.to_dict(),
        "state_dict": model.state_dict(),
    }
    replace_atomically(path, lambda tmp: torch.save(state, tmp))


def read_header(path: Path | str, map_location: str = "cpu") -> tuple[ModelHeader, dict[str, Any]]:
    """The header and the weights of a ``model.pt``, the weights memory-mapped on the CPU (a
    page is read when a lookup first touches it: an item table of 10M ads x 64 is 2.6 GB, of
    which the encoder step reads the rows of the histories it encodes).

    Raises:
        CandgenError: no such file, not a candgen model file, or one of another format version.
    """
    path = Path(path)
    if not path.exists():
        raise CandgenError(f"{path}: no such model file")
    try:
        mapped = map_location == "cpu"
        saved = torch.load(path, map_location=map_location, weights_only=False, mmap=mapped)
    except Exception as exc:  # a truncated or foreign file: torch's own error names no field
        raise CandgenError(f"{path}: not a model file torch can read ({exc})") from exc
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        if isinstance(saved, dict) and "config" in saved and "state_dict" in saved:
            raise CandgenError(
                f"{path}: a model file of an older candgen (format 1, without a "
                f"header); retrain it to get a format {VERSION} file"
            )
        raise CandgenError(f"{path}: not a candgen model file (no {FORMAT!r} header)")
    if saved.get("version") != VERSION:
        raise CandgenError(
            f"{path}: model file format {saved.get('version')!r}; this candgen "
            f"reads format {VERSION}"
        )
    try:
        header = ModelHeader.from_dict(saved["header"])
    except (KeyError, TypeError) as exc:
        raise CandgenError(f"{path}: its header is damaged ({exc})") from exc
    return header, saved["state_dict"]
