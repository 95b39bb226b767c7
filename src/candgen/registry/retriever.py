"""The registered model: a user encoder plus item embeddings, served as an MLflow pyfunc.

Input: a DataFrame with a ``history`` column (each row a list of item/ad ids, oldest first) and
optionally ``k``. Output: ``item_ids`` and ``scores`` (lists, best first), history excluded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from candgen.errors import CandgenError
from candgen.evaluation.metrics import chunked_topk
from candgen.models.base import RetrievalModel
from candgen.training.batches import pad_left

DEFAULT_K = 100


class Retriever:
    """Top-K retrieval with a trained model, in the data set's own item ids.

    Args:
        model: the trained model (its user encoder is used).
        item_ids: (N + 1,) external id of each internal id (row 0 is padding).
        item_table: (N + 1, D) item embeddings; computed from the model when None.
        max_len: the longest history the model reads.
    """

    def __init__(
        self,
        model: RetrievalModel,
        item_ids: np.ndarray,
        item_table: np.ndarray | None = None,
        max_len: int = 50,
    ) -> None:
        self.model = model.eval()
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self.index = {int(x): i for i, x in enumerate(self.item_ids) if i > 0}
        table = model.item_table() if item_table is None else torch.from_numpy(item_table)
        self.item_table = table.float()
        self.max_len = max_len

    def encode(self, histories: list[list[int]]) -> np.ndarray:
        """Maps external ids to internal ones; rejects ids outside the vocabulary."""
        out = []
        for row, hist in enumerate(histories):
            internal = []
            for item in hist:
                if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
                    raise CandgenError(f"history[{row}]: item ids must be integers, got {item!r}")
                if int(item) not in self.index:
                    raise CandgenError(
                        f"history[{row}]: item id {int(item)} is not in the model's vocabulary "
                        f"({len(self.index):,} items)"
                    )
                internal.append(self.index[int(item)])
            if not internal:
                raise CandgenError(f"history[{row}]: empty; give at least one item id")
            out.append(np.asarray(internal, dtype=np.int64))
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def retrieve(
        self, histories: list[list[int]], k: int = DEFAULT_K
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns (item ids, scores), each (len(histories), k), best first."""
        internal = self.encode(histories)
        if not 0 < k <= len(self.index):
            raise CandgenError(f"k: must be in 1..{len(self.index)}, got {k}")
        batch = {"items": torch.from_numpy(pad_left(internal, self.max_len))}
        queries = self.model.user_embedding(batch)
        top = chunked_topk(queries, self.item_table, k, internal)
        scores = torch.gather(queries @ self.item_table.T, 1, top)
        return self.item_ids[top.numpy()], scores.numpy()


def _mlflow_pyfunc_base() -> type:
    import mlflow.pyfunc

    return mlflow.pyfunc.PythonModel


class RetrieverPyfunc(_mlflow_pyfunc_base()):  # type: ignore[misc]
    """The MLflow pyfunc wrapper around ``Retriever`` (artifacts: model, item_embeddings)."""

    def load_context(self, context: Any) -> None:
        from candgen.training.trainer import load_model

        model, saved = load_model(Path(context.artifacts["model"]))
        table = np.load(context.artifacts["item_embeddings"])
        config = json.loads(Path(context.artifacts["config"]).read_text())
        self.retriever = Retriever(model, saved["item_ids"], table, config["max_len"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None):  # type: ignore[no-untyped-def]
        if "history" not in model_input.columns:
            raise CandgenError("history: the input needs a 'history' column of item id lists")
        k = int((params or {}).get("k", DEFAULT_K))
        ids, scores = self.retriever.retrieve([list(h) for h in model_input["history"]], k)
        return pd.DataFrame({"item_ids": list(ids), "scores": list(scores)})
