"""Partial int8 quantisation of the search query's encoder: ONNX Runtime dynamic int8 on the
MatMuls, per channel, with some layers left in fp32. Prints, per variant, p50/p99 per query
(cache miss, one thread, 200 distinct queries) and the lowest cosine to the fp32 ``TextEmbedder``
vectors (docs/benchmarks/serving_notes.md, section 4). Writes nothing into the repository.

    .venv/bin/python benchmarks/query_encoder_partial_int8.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from query_encoder import measure, queries

from candgen.endpoint.text_onnx import export_onnx, quantise
from candgen.features.text import TextEmbedder
from candgen.serving.query_encoder import ONNX_FILE, QueryEncoder


def main() -> int:
    torch.set_num_threads(1)
    texts = queries(200)
    ref = TextEmbedder(None, progress=False).embed(texts)
    work = Path(tempfile.mkdtemp())
    try:
        export_onnx(work / "fp32", "fp32")
        rows = {"fp32": measure(QueryEncoder(work / "fp32", cache_size=0).encode, texts, ref)}
        # Which MatMuls each variant leaves in fp32.
        variants: dict[str, Callable[[str], bool]] = {
            "int8 except the attention MatMuls": lambda n: "attention" in n.lower(),
            "int8 except the last 2 layers": lambda n: "layer.4" in n or "layer.5" in n,
            "int8 except the first layer": lambda n: "layer.0" in n,
        }
        for name, keep_fp32 in variants.items():
            out = work / name.replace(" ", "_")
            shutil.copytree(work / "fp32", out)
            kept, _ = quantise(work / "fp32" / ONNX_FILE, out / ONNX_FILE, keep_fp32)
            encoder = QueryEncoder(out, cache_size=0)
            rows[f"{name} ({len(kept)} fp32)"] = measure(encoder.encode, texts, ref)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
