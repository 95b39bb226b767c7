"""Serving benchmark. Stage implemented so far: the index (FAISS) on a synthetic ad corpus.

    python benchmarks/serving.py --stage index                  # 1M ads, 64-d, this machine
    python benchmarks/serving.py --stage index --ads 10000000 --device cuda --machine gpu

The corpus is a mixture of 1,000 Gaussian clusters (L2-normalised), so that neighbourhoods look
like learned embeddings rather than uniform noise; queries are fresh draws from the same mixture.
It measures exact search (the reference) and HNSW at several search beams: build time, recall@100
against exact, single-query latency p50/p95/p99 and batched throughput. The whole-ensemble stage
(Triton) comes with the rest of the serving issue.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench_doc import write_section  # noqa: E402

from candgen.index.ann import AdIndex, IndexConfig, recall_at_k  # noqa: E402

RESULTS = ROOT / "docs" / "benchmarks"
K = 100


def corpus(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1000, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 1_000_000):
        stop = min(start + 1_000_000, n)
        chunk = centers[rng.integers(0, 1000, stop - start)]
        chunk += 0.5 * rng.standard_normal(chunk.shape).astype(np.float32)
        out[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out, centers


def queries(centers: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    q = centers[rng.integers(0, len(centers), n)]
    q = q + 0.5 * rng.standard_normal(q.shape).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def latency_ms(index: AdIndex, qs: np.ndarray) -> dict[str, float]:
    times = []
    for q in qs:
        t0 = time.perf_counter()
        index.search(q[None], K)
        times.append((time.perf_counter() - t0) * 1e3)
    p50, p95, p99 = np.percentile(times, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def batched_qps(index: AdIndex, qs: np.ndarray) -> float:
    t0 = time.perf_counter()
    index.search(qs, K)
    return len(qs) / (time.perf_counter() - t0)


def stage_index(args: argparse.Namespace) -> dict[str, object]:
    t0 = time.perf_counter()
    vectors, centers = corpus(args.ads, args.dim, args.seed)
    ids = 1_000_000_000 + np.arange(1, args.ads + 1, dtype=np.int64)
    qs = queries(centers, args.queries, args.seed)
    print(f"corpus {args.ads:,} x {args.dim} in {time.perf_counter() - t0:.1f}s", flush=True)
    rows = []
    t0 = time.perf_counter()
    exact = AdIndex.build(ids, vectors, IndexConfig(kind="flat", device=args.device))
    build = time.perf_counter() - t0
    truth = exact.search(qs, K)[0]
    rows.append({"index": "exact (flat IP)", "build_s": build, "recall@100": 1.0,
                 "qps_batched": batched_qps(exact, qs),
                 **latency_ms(exact, qs[: args.latency_queries])})  # fmt: skip
    print(rows[-1], flush=True)
    if args.device == "cpu":
        t0 = time.perf_counter()
        hnsw = AdIndex.build(ids, vectors, IndexConfig(kind="hnsw", ef_construction=100))
        build = time.perf_counter() - t0
        for ef in (64, 128, 256):
            hnsw.config = IndexConfig(kind="hnsw", ef_search=ef, ef_construction=100)
            rows.append({"index": f"HNSW M=32 efC=100 efSearch={ef}", "build_s": build,
                         "recall@100": recall_at_k(hnsw.search(qs, K)[0], truth),
                         "qps_batched": batched_qps(hnsw, qs),
                         **latency_ms(hnsw, qs[: args.latency_queries])})  # fmt: skip
            print(rows[-1], flush=True)
    return {"rows": rows, "ads": args.ads, "dim": args.dim, "queries": args.queries,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), faiss "
                       f"{__import__('faiss').__version__}, device {args.device}",
            "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:])}  # fmt: skip


def render(results: dict[str, dict]) -> str:
    lines = ["## Serving: index stage (`benchmarks/serving.py --stage index`)", "",
             "Synthetic ads: a mixture of 1,000 Gaussian clusters, L2-normalised, inner product; "
             "queries are fresh draws from the mixture. Recall@100 is against exact search on the "
             "same queries. Latency is one query at a time (no batching); QPS is one batched "
             "call over all queries. Target (issue 4): ANN recall@100 >= 0.95.", ""]  # fmt: skip
    for machine, res in sorted(results.items()):
        lines += [f"### {res['ads']:,} ads x {res['dim']}, {res['queries']:,} queries; "
                  f"{res['machine']} (`{machine}`)", "",
                  "| index | build | recall@100 | p50 | p95 | p99 | QPS (batched) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in res["rows"]:
            lines.append(f"| {r['index']} | {r['build_s']:.1f} s | {r['recall@100']:.4f} | "
                         f"{r['p50_ms']:.2f} ms | {r['p95_ms']:.2f} ms | {r['p99_ms']:.2f} ms | "
                         f"{r['qps_batched']:,.0f} |")  # fmt: skip
        lines += ["", f"Peak RSS {res['peak_rss_mb']:,.0f} MB. Command: `{res['command']}`", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=["index"], default="index")
    p.add_argument("--ads", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1_000)
    p.add_argument("--latency-queries", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--machine", default="cpu")
    p.add_argument("--render-only", action="store_true", help="rewrite the doc from stored runs")
    args = p.parse_args()
    if not args.render_only:
        result = stage_index(args)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"serving_index_{args.machine}.json").write_text(json.dumps(result, indent=2))
    stored = {f.stem.removeprefix("serving_index_"): json.loads(f.read_text())
              for f in sorted(RESULTS.glob("serving_index_*.json"))}  # fmt: skip
    write_section("serving-index", render(stored))
    print("wrote docs/BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
