"""The MLflow pyfunc wrapper around ``Retriever`` (kept apart so that the retriever itself
imports without MLflow, as the serving runtime needs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc.model import PythonModel

from candgen.errors import CandgenError
from candgen.models.retriever import DEFAULT_K, Retriever


class RetrieverPyfunc(PythonModel):
    """The MLflow pyfunc wrapper around ``Retriever`` (artifacts: model, item_embeddings)."""

    def load_context(self, context: Any) -> None:
        from candgen.models.factory import load_model

        model, saved = load_model(Path(context.artifacts["model"]))
        table = np.load(context.artifacts["item_embeddings"])
        config = json.loads(Path(context.artifacts["config"]).read_text())
        self.retriever = Retriever(model, saved.item_ids, table, config["max_len"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if "history" not in model_input.columns:
            raise CandgenError("history: the input needs a 'history' column of item id lists")
        k = int((params or {}).get("k", DEFAULT_K))
        ids, scores = self.retriever.retrieve([list(h) for h in model_input["history"]], k)
        return pd.DataFrame({"item_ids": list(ids), "scores": list(scores)})
