"""Filtered ANN for ads eligibility (issue 15): which ads a request may get, inside the search.

    python benchmarks/filtered_search.py                       # the serving benchmark's 1M index
    python benchmarks/filtered_search.py --index PATH.faiss    # any saved AdIndex (HNSW)

For each request a different set of ads is ineligible (targeting, frequency caps, hidden
advertisers), 30-70% of the corpus for a typical user. Two ways to keep them out of the top K:

- *filtered HNSW*: the request's eligibility as a bitmap over the index's internal positions
  (``faiss.IDSelectorBitmap``, one bit per ad, built from a boolean mask with ``np.packbits``),
  handed to the HNSW search, which skips ineligible ads as it walks the graph;
- *over-fetch*: an unfiltered search for K / (1 - f) x margin ads, the ineligible ones dropped
  afterwards; short when the margin is too small.

Masks are drawn two ways: *random* (each ad ineligible with probability f, independently of
where it lies) and *half-space* (the ads on one side of a random hyperplane, shifted to cover f:
eligibility correlated with the embedding, the hard case for a graph walk, like a targeting rule
that removes a whole region of the catalogue). The reference is exact search over the eligible
ads. Reported: recall@100 against it, answers shorter than K, single-query latency, and the cost
of building the bitmap from a mask.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_doc import write_section

from candgen.index.ann import recall_at_k

K = 100
DEFAULT_INDEX = Path("data/bench_serving/repo/candgen_generators/1/ads.faiss")
RESULT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "filtered_search.json"


def _masks(vectors: np.ndarray, fraction: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A boolean eligibility mask (True: the request may get the ad)."""
    if kind == "random":
        return rng.random(len(vectors)) >= fraction
    side = vectors @ rng.standard_normal(vectors.shape[1]).astype(np.float32)
    return side >= np.quantile(side, fraction)


def _bitmap(mask: np.ndarray):  # type: ignore[no-untyped-def]  # -> (selector, its bytes)
    import faiss

    bits = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits)), bits


def _percentiles(ms: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(ms), [50, 99])
    return float(p50), float(p99)


def run(args: argparse.Namespace) -> dict[str, object]:
    import faiss

    faiss.omp_set_num_threads(1)  # one request at a time, as a serving step searches
    stored = faiss.read_index(str(args.index))
    hnsw = faiss.downcast_index(faiss.downcast_index(stored).index)
    if not isinstance(hnsw, faiss.IndexHNSW):
        raise SystemExit(f"--index: {args.index} is not an HNSW index")
    n = hnsw.ntotal
    vectors = hnsw.storage.reconstruct_n(0, n)
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(n, args.queries, replace=False)
    queries = vectors[picks] + 0.5 / math.sqrt(vectors.shape[1]) * rng.standard_normal(
        (args.queries, vectors.shape[1])
    ).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    rows = []
    for kind in ("random", "half-space"):
        for fraction in args.fractions:
            masks = [_masks(vectors, fraction, kind, rng) for _ in range(args.queries)]
            truth, build_ms = [], []
            for q, mask in zip(queries, masks, strict=True):
                t0 = time.perf_counter()
                sel, _bits = _bitmap(mask)
                build_ms.append((time.perf_counter() - t0) * 1e3)
                _, ids = flat.search(q[None], K, params=faiss.SearchParameters(sel=sel))
                truth.append(ids[0][ids[0] >= 0])
            methods: list[tuple[str, int, int]] = [
                (f"filtered HNSW, efSearch {ef}", ef, 0) for ef in args.ef_search
            ]
            for margin in args.margins:
                want = math.ceil(K / (1 - fraction) * margin)
                methods.append((f"over-fetch {want} (x{margin})", max(want, 256), want))
            for name, ef, fetch in methods:
                found, times, short = [], [], 0
                for q, mask in zip(queries, masks, strict=True):
                    t0 = time.perf_counter()
                    if fetch:
                        params = faiss.SearchParametersHNSW(efSearch=ef)
                        _, ids = hnsw.search(q[None], fetch, params=params)
                        ids = ids[0][ids[0] >= 0]
                        ids = ids[mask[ids]][:K]
                    else:
                        sel, _bits = _bitmap(mask)
                        params = faiss.SearchParametersHNSW(efSearch=ef, sel=sel)
                        _, ids = hnsw.search(q[None], K, params=params)
                        ids = ids[0][ids[0] >= 0]
                    times.append((time.perf_counter() - t0) * 1e3)
                    found.append(ids)
                    short += len(ids) < K
                recall = recall_at_k(found, truth)
                p50, p99 = _percentiles(times)
                rows.append(
                    {
                        "mask": kind,
                        "ineligible": fraction,
                        "method": name,
                        "recall@100": recall,
                        "short_answers": short,
                        "p50_ms": p50,
                        "p99_ms": p99,
                        "bitmap_ms_p50": _percentiles(build_ms)[0],
                    }
                )
                print(rows[-1], flush=True)
    return {
        "rows": rows,
        "ads": n,
        "dim": int(vectors.shape[1]),
        "queries": args.queries,
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), FAISS "
        f"{faiss.__version__}, one thread",
        "command": "python benchmarks/filtered_search.py " + " ".join(sys.argv[1:]),
    }


def render(res: dict) -> str:  # type: ignore[type-arg]
    lines = [
        "## Filtered ANN for eligibility (`benchmarks/filtered_search.py`, issue 15)",
        "",
        f"{res['ads']:,} ads x {res['dim']} (the serving benchmark's HNSW index), "
        f"{res['queries']} queries near the corpus, K = {K}; each query gets its own "
        "eligibility mask. Recall@100 is against exact search over the eligible ads; a short "
        "answer has fewer than K ads. Bitmap: building the request's IDSelectorBitmap from its "
        f"boolean mask. {res['machine']}. Command: `{res['command']}`",
        "",
        "| mask | ineligible | method | recall@100 | short answers | p50 | p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['mask']} | {r['ineligible']:.0%} | {r['method']} | {r['recall@100']:.4f} | "
            f"{r['short_answers']} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms |"
        )
    bitmap = np.median([r["bitmap_ms_p50"] for r in res["rows"]])
    lines += ["", f"The bitmap for {res['ads']:,} ads takes {bitmap:.2f} ms p50 to build.", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", type=Path, default=DEFAULT_INDEX)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--ef-search", type=int, nargs="+", default=[256, 512])
    p.add_argument("--margins", type=float, nargs="+", default=[1.5, 3.0])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not args.index.exists():
        raise SystemExit(
            f"--index: {args.index} does not exist; `python benchmarks/serving.py --stage "
            "ensemble` builds the 1M-ad one"
        )
    if not all(0 <= f < 1 for f in args.fractions):
        raise SystemExit(f"--fractions: each must lie in [0, 1), got {args.fractions}")
    res = run(args)
    RESULT.write_text(json.dumps(res, indent=2))
    write_section("filtered_search", render(res))
    print("wrote docs/BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
