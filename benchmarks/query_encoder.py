"""The search query's encoder, in-process on one thread: latency per query (cache miss and hit)
and closeness to the ads' text vectors, for the encoders considered (docs/benchmarks/
serving_notes.md, section 4).

    .venv/bin/python benchmarks/query_encoder.py [--queries 200]

Runs in the platform environment (it needs transformers for the torch rows); prints one JSON
object. What the kept encoder adds to a request's p99 in the live ensemble is measured by
``benchmarks/serving.py --stage ensemble`` (``context.query_encoder_p99_ms_added``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from candgen.endpoint.text_onnx import export_onnx
from candgen.features.text import TextEmbedder, load_model
from candgen.serving.query_encoder import ONNX_FILE, QueryEncoder

WORDS = [
    "red",
    "blue",
    "running",
    "shoes",
    "waterproof",
    "jacket",
    "wireless",
    "earbuds",
    "phone",
    "case",
    "sofa",
    "lamp",
    "organic",
    "coffee",
    "beans",
    "yoga",
    "mat",
]


def queries(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 7)))) + f" {i}" for i in range(n)]


def measure(encode: Callable[[str], np.ndarray], texts: list[str], ref: np.ndarray) -> dict:
    for t in texts[:10]:
        encode(t + " warm-up")
    times, out = [], []
    for t in texts:
        start = time.perf_counter()
        out.append(encode(t))
        times.append((time.perf_counter() - start) * 1000)
    cos = (np.stack(out) * ref).sum(1)
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 3),
        "p99_ms": round(float(np.percentile(times, 99)), 3),
        "min_cosine": round(float(cos.min()), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    texts = queries(args.queries)
    ref = TextEmbedder(None, progress=False).embed(texts)
    st = load_model()
    tok, bert = st[0].tokenizer, st[0].auto_model.eval()

    def torch_encoder(model: torch.nn.Module) -> Callable[[str], np.ndarray]:
        def encode(text: str) -> np.ndarray:
            batch = tok([text], truncation=True, max_length=256, return_tensors="pt")
            with torch.inference_mode():
                hidden = model(**batch).last_hidden_state
            return torch.nn.functional.normalize(hidden.mean(1), dim=-1)[0].numpy()

        return encode

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    rows = {
        "torch eager fp32": measure(torch_encoder(bert), texts, ref),
        "torch int8 dynamic (per-channel)": measure(
            torch_encoder(quantize_dynamic(bert, {torch.nn.Linear: per_channel_dynamic_qconfig})),
            texts,
            ref,
        ),
    }
    work = Path(tempfile.mkdtemp())
    try:
        export_onnx(work / "fp32", "fp32")
        encoder = QueryEncoder(work / "fp32", cache_size=0)
        rows["onnxruntime fp32"] = measure(encoder.encode, texts, ref)
        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization import quantize_dynamic as ort_quantize

        shutil.copytree(work / "fp32", work / "int8")
        ort_quantize(
            work / "fp32" / ONNX_FILE,
            work / "int8" / ONNX_FILE,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
        rows["onnxruntime int8 (per-channel)"] = measure(
            QueryEncoder(work / "int8", cache_size=0).encode, texts, ref
        )
        export_onnx(work / "kept", "int8")
        rows["onnxruntime int8 except the first layer (kept)"] = measure(
            QueryEncoder(work / "kept", cache_size=0).encode, texts, ref
        )
        cached = QueryEncoder(work / "kept", cache_size=2 * len(texts))  # the warm-up fits too
        for t in texts:
            cached.encode(t)
        rows["kept, cache hit"] = measure(cached.encode, texts, ref)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, 1 thread"
    print(
        json.dumps(
            {
                "machine": machine,
                "queries": len(texts),
                "rows": rows,
                "wall_s": round(time.perf_counter() - t0, 1),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
