"""Serving benchmark: the index (FAISS) alone, and the whole Triton ensemble, on 1M ads.

    python benchmarks/serving.py --stage index                  # 1M ads, 64-d, this machine
    python benchmarks/serving.py --stage index --ads 10000000 --device cuda --machine gpu
    python benchmarks/serving.py --stage ensemble               # live tritonserver + Feast
    python benchmarks/serving.py --stage ensemble --ads 10000000 --ad-index ivf4k-pq32-fp16 \
        --content-index ivf4k-hnsw-pq48 --nprobe 8 --machine cpu-10M   # issue 17's figures

The corpus is a mixture of 1,000 Gaussian clusters (L2-normalised), so that neighbourhoods look
like learned embeddings rather than uniform noise; queries are fresh draws from the same mixture.
It measures exact search (the reference) and HNSW at several search beams: build time, recall@100
against exact, single-query latency p50/p95/p99 and batched throughput.

The ensemble stage serves the same kind of corpus through the real `retrieve` ensemble: a small
synthetic marketplace gives users, their online features (Feast, SQLite, behind the Feast feature
server) and the first ads of a 1M-ad vocabulary; an HSTU user encoder (random weights: speed does
not depend on training) holds the corpus as its ad embeddings; the content and query generators
index 1M synthetic "text" vectors as wide as the query encoder's (MiniLM, 384-d). It measures
latency p50/p95/p99 and throughput at concurrency 1, 4 and 16 through the whole ensemble (gRPC),
ANN-only and exact search on the same user vectors, and, as the profile, the time each step
spends per request from Triton's own statistics.

Traffic comes in three kinds, on the same server, interleaved request by request at concurrency
1 (the p99 comparison; 200 s shared by the three) and, the first two, sent alone at 4 and 16:
without context (no request carries a query
or a context item, as before the surfaces had any); with logged context (search requests carry
a query drawn from the marketplace's search log, repeats included, so the query encoder's cache
warms as it would in production; related requests carry an item); and with unseen queries (each
search query made new by a numbered suffix, so every one misses the cache: the worst case). The
p99 rise at concurrency 1 from the first kind to the last is ``context.query_encoder_p99_ms_added``.

At 10M ads (``--ads 10000000``) the indexes are compressed (``--ad-index``, ``--content-index``:
benchmarks/scale.py's IVF-PQ configurations, and ``TEXT_INDEXES`` over the 384-d text), the ads'
text is written to disk a million rows at a time and indexed from there, past the 1M-ad
marketplace the ads repeat its campaigns and advertisers, and the run records the peak resident
memory of every server process: its figures are issue 17's ``scale.*`` (benchmarks/scale.py
``headline``), not the 1M run's.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import itertools
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench_doc import write_headline, write_section  # noqa: E402

from candgen.endpoint.trace import RequestTrace, read_trace, trace_parts  # noqa: E402
from candgen.index.ann import SEARCH_SETTINGS, AdIndex, IndexConfig, recall_at_k  # noqa: E402
from candgen.serving.query_encoder import PRECISIONS  # noqa: E402

RESULTS = ROOT / "docs" / "benchmarks"
K = 100
BACKOFF_S = 0.1  # a load client's pause after the server refused a request as busy
SCALE_ADS = 10_000_000  # an ensemble run this large gives issue 17's figures (scale.headline)


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
    rows.append(
        {
            "index": "exact (flat IP)",
            "build_s": build,
            "recall@100": 1.0,
            "qps_batched": batched_qps(exact, qs),
            **latency_ms(exact, qs[: args.latency_queries]),
        }
    )
    print(rows[-1], flush=True)
    if args.device == "cpu":
        t0 = time.perf_counter()
        hnsw = AdIndex.build(ids, vectors, IndexConfig(kind="hnsw", ef_construction=100))
        build = time.perf_counter() - t0
        for ef in (64, 128, 256):
            hnsw.config = IndexConfig(kind="hnsw", ef_search=ef, ef_construction=100)
            rows.append(
                {
                    "index": f"HNSW M=32 efC=100 efSearch={ef}",
                    "build_s": build,
                    "recall@100": recall_at_k(hnsw.search(qs, K)[0], truth),
                    "qps_batched": batched_qps(hnsw, qs),
                    **latency_ms(hnsw, qs[: args.latency_queries]),
                }
            )
            print(rows[-1], flush=True)
    return {
        "rows": rows,
        "ads": args.ads,
        "dim": args.dim,
        "queries": args.queries,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), faiss "
        f"{__import__('faiss').__version__}, device {args.device}",
        "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:]),
    }


def _model_file(
    path: Path, item_ids: np.ndarray, item_vectors: np.ndarray, max_len: int, block_scale: float
) -> None:
    """An HSTU whose item embeddings are the benchmark corpus, saved as training saves it.

    Its attention blocks' output weights are scaled by ``block_scale``: at 0.1 a user vector
    stays near the items of its history, as a trained encoder's does; at 1.0 the random blocks
    give vectors that resemble no ad, which no trained model would serve.
    """
    import torch

    from candgen.models.factory import build_model
    from candgen.models.saved import ModelHeader, save_model
    from candgen.training.config import TrainConfig

    cfg = TrainConfig(
        dataset="marketplace", model="hstu", dim=item_vectors.shape[1], max_len=max_len, track=False
    )
    n = len(item_ids) - 1
    torch.manual_seed(0)
    model = build_model(cfg, n, torch.zeros(n + 1, 1, dtype=torch.long), has_timestamps=True)
    with torch.no_grad():
        model.item_emb.weight[1:] = torch.from_numpy(item_vectors)
        for block in model.blocks:
            block.out.weight.mul_(block_scale)
    header = ModelHeader(
        model=cfg.model_config(),
        data=cfg.data_config(),
        item_ids=item_ids,
        has_timestamps=True,
        training=cfg.to_dict(),
    )
    save_model(path, model, header)
    model.eval()
    with torch.no_grad():
        np.save(path.parent / "item_embeddings.npy", model.item_table().numpy())


# What ``_generative_model`` builds, as the results and a reused repository's build record say.
GENERATIVE_TRANSDUCER = (
    "unified transducer (request surface, query and context item; the dense head orders the beam)"
)


def _generative_model(
    folder: Path,
    item_ids: np.ndarray,
    item_vectors: np.ndarray,
    ad_ids: np.ndarray,
    max_len: int,
    beam_width: int,
    query_text_dim: int,
) -> dict[str, object]:
    """A generative model over the corpus, saved as the export stages one (``model.pt`` and the
    ads it may write): every item's semantic ID fitted on its corpus vector as `candgen
    semantic-ids` fits a trained model's items, and the transducer the ablation chose (the
    unified model's, reading each request's surface, query and context item, with the dense
    head ordering the beam) and a decoder, with random weights. Its speed does not depend on
    training: the beam search's work is set by its width, the decoder's vocabularies and the
    trie of the ads' IDs. It has no item text and no long-term summary (a cold ad's text
    enters the table, not the request path)."""
    import torch

    from candgen.models.factory import build_model
    from candgen.models.saved import ModelHeader, save_model
    from candgen.models.semantic_ids import SemanticIds
    from candgen.serving.steps import GENERATIVE_ADS_FILE, MODEL_FILE
    from candgen.training.config import TrainConfig

    t0 = time.perf_counter()
    unit = item_vectors / np.linalg.norm(item_vectors, axis=1, keepdims=True)
    codebooks = SemanticIds.fit(unit)
    codes = codebooks.assign(item_ids[1:], unit)
    table = torch.from_numpy(np.concatenate([np.zeros((1, codes.shape[1]), np.int64), codes]))
    cfg = TrainConfig(dataset="marketplace", model="generative", backbone="unified",
                      dense_weight=1.0, semantic_ids="(the benchmark's)",
                      dim=item_vectors.shape[1], max_len=max_len, beam_width=beam_width,
                      track=False)  # fmt: skip
    torch.manual_seed(0)
    n = len(item_ids) - 1
    # the request context the marketplace logs: labels, surfaces, queries and context items
    model = build_model(cfg, n, torch.zeros(n + 1, 1, dtype=torch.long), has_timestamps=True,
                        has_labels=True, query_text_dim=query_text_dim, has_context_items=True,
                        semantic_ids=table)  # fmt: skip
    header = ModelHeader(model=cfg.model_config(), data=cfg.data_config(), item_ids=item_ids,
                         has_timestamps=True, has_labels=True, query_text_dim=query_text_dim,
                         has_context_items=True, training=cfg.to_dict())  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder / MODEL_FILE, model, header)
    np.save(folder / GENERATIVE_ADS_FILE, np.asarray(ad_ids, np.int64))
    return {
        "generative_ids_levels": int(codes.shape[1]),
        "generative_vocab_sizes": [int(v) + 1 for v in codes.max(axis=0)],
        "generative_build_s": time.perf_counter() - t0,
    }


AD_TEXTS = 20_000  # distinct marketplace ad texts whose MiniLM embeddings centre the ads' text
TEXT_SPREAD = 0.33  # an ad's text vector: its centre plus noise of this norm (cosine about 0.95)


def _ad_text_vectors(n: int, work: Path, seed: int, out_file: Path) -> np.ndarray:
    """The ads' text vectors in MiniLM's own space, written to ``out_file`` (a .npy, a million
    rows at a time: 15 GB at 10M ads) and returned memory-mapped: ``AD_TEXTS`` marketplace ad
    texts embedded as the features build embeds them, each the centre of about n / AD_TEXTS
    ads. Random vectors (the benchmark's first corpus) left every search query's embedding far
    from all ads: the query generator's HNSW search then found 40% of the exact top 100 at
    efSearch 256 and searched longer than it would among real ad texts."""
    import pandas as pd

    from candgen.data.synth import SynthConfig, generate
    from candgen.features.text import TextEmbedder, ad_texts

    out_dir = work / "ad_texts"
    if not (out_dir / "ads.parquet").exists():
        config = SynthConfig(users=1, ads=AD_TEXTS, days=1, seed=seed + 7)
        generate(config, out_dir, progress=False, overwrite=True)
    ads = pd.read_parquet(out_dir / "ads.parquet", columns=["title", "description"])
    embedder = TextEmbedder(work / "ad_text_cache.parquet", batch_size=256)
    centres = embedder.embed(ad_texts(ads["title"], ads["description"]))
    rng = np.random.default_rng(seed + 7)
    dim = centres.shape[1]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(out_file, "w+", np.float32, (n, dim))
    for start in range(0, n, 1_000_000):
        stop = min(start + 1_000_000, n)
        chunk = centres[rng.integers(0, len(centres), stop - start)]
        chunk += (TEXT_SPREAD / np.sqrt(dim)) * rng.standard_normal(chunk.shape).astype(np.float32)
        out[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    out.flush()
    del out
    mapped: np.ndarray = np.load(out_file, mmap_mode="r")
    return mapped


def _market(
    work: Path, seed: int, online: str = "sqlite"
):  # -> (store, users, items, ads, queries)
    import pandas as pd

    from candgen.data.synth import SynthConfig, generate
    from candgen.features.build import FeatureBuildConfig, build_features
    from candgen.features.store import StoreConfig, apply, materialize

    summary = generate(
        SynthConfig(users=2_000, ads=2_000, items=2_000, days=7, seed=seed),
        work / "market",
        progress=False,
        overwrite=True,
    )
    build_features(
        summary.out_dir, work / "features", FeatureBuildConfig(embed_text=False), progress=False
    )
    # Redis keys are namespaced by project: the benchmark's own, beside any other candgen store.
    store = StoreConfig(
        online=online,
        features_dir=work / "features",
        state_dir=work / f"feast-{online}",
        project=f"candgen_bench_{online}",
    )
    apply(store)
    materialize(store)
    users = pd.read_parquet(work / "features" / "user_short_term.parquet")["user_id"]
    items = pd.read_parquet(summary.out_dir / "items.parquet")["item_id"].to_numpy(np.int64)
    ads = pd.read_parquet(summary.out_dir / "ads.parquet")["ad_id"].to_numpy(np.int64)
    # One row per search session: each request of the load is one session's query.
    log = pd.read_parquet(summary.out_dir / "events", columns=["session_id", "query"])
    logged = log.dropna().drop_duplicates("session_id")["query"].tolist()
    return store, np.unique(users.to_numpy(np.int64)), items, ads, logged


def _corpus_ids(
    args: argparse.Namespace, items: np.ndarray, market_ads: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The encoder's item vectors (organic items, then ads: one mixture) and the ads' ids."""
    from candgen.data.synth import AD_ID_OFFSET

    everything, _ = corpus(len(items) + args.ads, args.dim, args.seed)
    extra = AD_ID_OFFSET + 10_000_000 + np.arange(1, args.ads - len(market_ads) + 1)
    return everything, np.concatenate([market_ads, extra]).astype(np.int64)


# Indexes over the ads' 384-d text at 10M ads, where a refine copy would not fit (fp16: 7.7 GB):
# PQ codes only, 8 or 4 dimensions a byte; cells found through a graph and trained on 32 vectors
# a cell (k-means and the assignment over 4,096 384-d centroids were most of the build).
TEXT_INDEXES: dict[str, dict[str, object]] = {
    "ivf4k-hnsw-pq48": {
        "kind": "ivfpq",
        "pq_m": 48,
        "ivf_nlist": 4096,
        "ivf_quantizer": "hnsw",
        "refine": "none",
        "train_size": 131_072,
    },
    "ivf4k-hnsw-pq96": {
        "kind": "ivfpq",
        "pq_m": 96,
        "ivf_nlist": 4096,
        "ivf_quantizer": "hnsw",
        "refine": "none",
        "train_size": 131_072,
    },
}


def index_config(name: str, args: argparse.Namespace) -> IndexConfig:
    """An index named by ``--ad-index``/``--content-index``: hnsw (built with
    ``--ef-construction``) or one of benchmarks/scale.py's compressed ``CONFIGS``, searched with
    this run's ``--ef-search``, ``--nprobe`` and ``--refine-factor``."""
    built = {"kind": "hnsw", "ef_construction": args.ef_construction}
    return IndexConfig(
        **(built if name == "hnsw" else _built(name)),  # type: ignore[arg-type]
        **{setting: getattr(args, setting) for setting in SEARCH_SETTINGS},
    )


def _built(name: str) -> dict[str, object]:
    """A compressed index's build settings: benchmarks/scale.py's or ``TEXT_INDEXES``."""
    from scale import CONFIGS

    return (CONFIGS | TEXT_INDEXES)[name]


def _build_repository(
    args: argparse.Namespace,
    work: Path,
    items: np.ndarray,
    market_ads: np.ndarray,
    feature_url: str,
) -> tuple[dict, np.ndarray, np.ndarray]:
    from candgen.endpoint.export import publish, stage_generators, stage_query_encoder
    from candgen.index.ann import INDEX_FILE
    from candgen.serving.generators import TEXT_FILE, ContentGenerator
    from candgen.serving.steps import (
        CONTENT_DIR,
        STEPS,
        EncoderStep,
        FeaturesStep,
        GeneratorsStep,
        ServingConfig,
    )

    t0 = time.perf_counter()
    everything, ad_ids = _corpus_ids(args, items, market_ads)
    vectors = everything[len(items) :]
    item_ids = np.concatenate([[0], items, ad_ids]).astype(np.int64)
    staging = work / "repo" / ".staging-1"
    for step in STEPS:
        (staging / step.MODEL).mkdir(parents=True, exist_ok=True)
    _model_file(
        staging / EncoderStep.MODEL / "model.pt",
        item_ids,
        everything,
        args.max_len,
        args.encoder_block_scale,
    )
    generative: dict[str, object] = {}
    if args.generative:
        from candgen.serving.steps import GENERATIVE_DIR

        generative = _generative_model(
            staging / EncoderStep.MODEL / GENERATIVE_DIR,
            item_ids,
            everything,
            ad_ids,
            args.max_len,
            args.generative_depth,
            args.text_dim,
        )
        print(f"generative model: {generative}", flush=True)
    del everything
    query_model = stage_query_encoder(staging / FeaturesStep.MODEL, args.query_encoder_precision)
    if args.text_dim != query_model["dim"]:
        raise SystemExit(
            f"--text-dim {args.text_dim}: the query generator searches the ads' text vectors with "
            f"the query's {query_model['dim']}-d embedding; use --text-dim {query_model['dim']}"
        )
    index_cfg = index_config(args.ad_index, args)
    gen = staging / GeneratorsStep.MODEL
    t1 = time.perf_counter()
    AdIndex.build(ad_ids, vectors, index_cfg, progress=True).save(gen / INDEX_FILE)
    seq_build = time.perf_counter() - t1
    # Written where the export keeps it (ContentGenerator.save writes no second copy).
    text_file = gen / CONTENT_DIR / TEXT_FILE
    text = _ad_text_vectors(args.ads, work, args.seed, text_file)
    rng = np.random.default_rng(args.seed + 8)  # not the text centres' stream (seed + 7)
    categories = rng.integers(0, 24, args.ads)
    t1 = time.perf_counter()
    content = ContentGenerator.from_file(
        ad_ids, text_file, categories, 24, index_config(args.content_index, args), progress=True
    )
    content_build = time.perf_counter() - t1
    impressions = rng.integers(0, 5_000, args.ads)
    # The market's ads lead the popularity ranking, so that a pause pushed to the live store
    # (benchmarks/constraints.py: only the market's campaigns are in it) hits ads in the answers.
    ctr = np.where(np.arange(args.ads) < len(market_ads), 0.2, 0.02)
    stage_generators(
        gen,
        content,
        {
            "ad_ids": ad_ids,
            "impressions": impressions,
            "clicks": rng.binomial(impressions, ctr),
            "budget_left_fraction": rng.random(args.ads).astype(np.float32),
            "ineligible": ad_ids[rng.random(args.ads) < 0.02],
        },
    )
    serving = ServingConfig(feature_server_url=feature_url, max_k=1_000)
    from constraints import write_constraints

    constraints = write_constraints(
        gen,
        staging / STEPS[3].MODEL,
        work,
        ad_ids,
        text,
        serving.duplicate_similarity,
        args.seed,
    )
    publish(work / "repo", staging, 1, serving, index_cfg, {"benchmark": "serving ensemble"})
    info = {
        "build_s": time.perf_counter() - t0,
        "seq_index_build_s": seq_build,
        "content_index_build_s": content_build,
        "constraints": constraints,
        **generative,
    }
    return info, ad_ids, vectors


TRAFFIC = ("no context", "logged context", "unseen queries")


@dataclass
class Traffic:
    """What the load's requests carry beyond user and surface (see the module's docstring).

    ``sent`` holds every query sent to the server so far, so that a level can say how many of
    its queries the encoder had seen before (its cache holds more than the whole log)."""

    kind: str
    queries: list[str]
    items: np.ndarray
    sent: set[str]
    fresh: itertools.count  # type: ignore[type-arg]

    def context(self, surface: str, rng: np.random.Generator) -> tuple[str | None, int | None]:
        if self.kind == "no context" or surface == "home":
            return None, None
        if surface == "related":
            return None, int(self.items[rng.integers(len(self.items))])
        query = self.queries[int(rng.integers(len(self.queries)))]
        return (query if self.kind == "logged context" else f"{query} {next(self.fresh)}"), None


Request = tuple[float, str, float, int, int]  # start s, surface, ms, start ns, end ns


def _load(
    url: str,
    users: np.ndarray,
    seconds: float,
    concurrency: int,
    seed: int,
    traffics: list[Traffic],
) -> list[dict]:
    """Closed-loop load; each request takes one of ``traffics`` at random, so that kinds sent
    together meet the same machine (this shared VM's speed drifts by more than the effects
    measured). Returns one level per kind; ``_requests`` (dropped before a result is stored)
    holds each answered request's (start second, surface, latency ms, start and end on the
    monotonic clock in ns) for ``p99_rise`` and ``trace_tail``."""
    import threading
    from collections import defaultdict

    from candgen.endpoint.client import RetrieveClient, ServerBusy

    lock = threading.Lock()
    done: dict[str, list[Request]] = defaultdict(list)
    errors: dict[str, list[str]] = defaultdict(list)
    rejected: dict[str, list[float]] = defaultdict(list)  # ms until the rejection came
    counts: dict[str, list[int]] = {t.kind: [0, 0, 0] for t in traffics}  # fallbacks, q, seen
    start = time.perf_counter()
    stop_at = start + seconds

    def worker(i: int) -> None:
        client = RetrieveClient(url, "grpc")
        rng = np.random.default_rng(seed * 100 + i)
        surfaces = ("home", "search", "related")
        while time.perf_counter() < stop_at:
            traffic = traffics[int(rng.integers(len(traffics)))]
            user = int(users[rng.integers(len(users))])
            surface = surfaces[int(rng.integers(3))]
            query, item = traffic.context(surface, rng)
            if query is not None:
                with lock:
                    counts[traffic.kind][1] += 1
                    counts[traffic.kind][2] += query in traffic.sent
                    traffic.sent.add(query)
            t0, t0_ns = time.perf_counter(), time.monotonic_ns()
            try:
                res = client.retrieve(user, surface, K, query=query, context_item_id=item)
            except ServerBusy:  # the server's explicit, retryable refusal under overload
                with lock:
                    rejected[traffic.kind].append((time.perf_counter() - t0) * 1e3)
                time.sleep(BACKOFF_S)  # as a client that honours a retryable status would
                continue
            except Exception as e:  # counted and reported, never hidden
                with lock:
                    errors[traffic.kind].append(repr(e))
                continue
            ms = (time.perf_counter() - t0) * 1e3
            with lock:
                done[traffic.kind].append((t0 - start, surface, ms, t0_ns, time.monotonic_ns()))
                counts[traffic.kind][0] += res.fallback  # answered without features

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    total = sum(len(v) for v in done.values()) / wall
    levels = []
    for t in traffics:
        times = np.asarray([r[2] for r in done[t.kind]])
        p50, p95, p99 = np.percentile(times, [50, 95, 99]) if len(times) else (np.nan,) * 3
        fallbacks, queries, seen = counts[t.kind]
        levels.append(
            {
                "traffic": t.kind,
                "concurrency": concurrency,
                "interleaved_with": [o.kind for o in traffics if o is not t],
                "requests": len(times),
                "queries": queries,
                "repeated_queries": seen,
                "errors": len(errors[t.kind]),
                "rejected": len(rejected[t.kind]),
                "rejected_p99_ms": float(np.percentile(rejected[t.kind], 99))
                if rejected[t.kind]
                else 0.0,
                "fallbacks": fallbacks,
                "first_error": errors[t.kind][0] if errors[t.kind] else "",
                "qps": len(times) / wall,  # answered requests only
                "level_qps": total,
                "seconds": wall,
                "p50_ms": float(p50),
                "p95_ms": float(p95),
                "p99_ms": float(p99),
                "_requests": done[t.kind],
            }
        )
    return levels


def p99_rise(
    with_context: list[Request],
    without: list[Request],
    seed: int,
    surface: str = "",
    window_s: float = 10.0,
) -> dict[str, float]:
    """p99(with) - p99(without) over the requests of ``surface`` (all when empty), and its 90%
    interval from a block bootstrap: whole ``window_s`` windows of the run are resampled, both
    kinds' requests of a window together, so that a slow phase of the machine moves both sides
    as it did in the run (a request-level bootstrap would take its tail samples as independent).
    """

    def rows(requests: list[Request]) -> tuple[np.ndarray, np.ndarray]:
        kept = [(r[0], r[2]) for r in requests if not surface or r[1] == surface]
        if len(kept) < 100:
            raise SystemExit(f"p99_rise: {len(kept)} requests of {surface or 'all'} surfaces")
        arr = np.asarray(kept)
        return (arr[:, 0] // window_s).astype(int), arr[:, 1]

    (w_with, ms_with), (w_without, ms_without) = rows(with_context), rows(without)
    windows = np.unique(np.concatenate([w_with, w_without]))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(2_000):
        picked = rng.choice(windows, len(windows))
        counts = np.bincount(picked, minlength=windows.max() + 1)
        a, b = np.repeat(ms_with, counts[w_with]), np.repeat(ms_without, counts[w_without])
        if len(a) and len(b):
            draws.append(np.percentile(a, 99) - np.percentile(b, 99))
    low, high = np.percentile(draws, [5, 95])
    rise = np.percentile(ms_with, 99) - np.percentile(ms_without, 99)
    return {
        "rise_ms": float(rise),
        "low_ms": float(low),
        "high_ms": float(high),
        "windows": len(windows),
    }


def server_side(
    traces: list[RequestTrace], since_ns: int, until_ns: int, steps: int
) -> dict[str, float]:
    """The server's own view of a level (Triton's trace of every request that started in it):
    the p50 and p99 of the answered requests' time from arrival to answer (all ``steps`` run),
    and how many were refused in a queue (Triton's queue policy) or answered with an error
    before the last step (the door's in-flight limit). The client's latency adds gRPC, its
    library and, on a machine it shares with the server, the wait for a core."""
    level = [t for t in traces if since_ns <= t.start_ns <= until_ns]
    answered = [t.total_ms for t in level if not t.refused and len(t.steps) >= steps]
    p50, p99 = np.percentile(answered, [50, 99]) if answered else (-1.0, -1.0)  # -1: none
    return {
        "server_p50_ms": float(p50),
        "server_p99_ms": float(p99),
        "server_answered": len(answered),
        "server_refused_in_queue": sum(t.refused for t in level),
        # ended at the door without a queue refusal: its in-flight limit's UNAVAILABLE
        "server_refused_at_door": sum(not t.refused and len(t.steps) == 1 for t in level),
        "server_failed_later": sum(not t.refused and 1 < len(t.steps) < steps for t in level),
    }


def trace_tail(
    traces: list[RequestTrace], done: dict[str, list[Request]], steps: list[str]
) -> list[dict[str, object]]:
    """Where the time of the slowest 1% went against the middle of the distribution, per
    traffic kind and surface, from Triton's trace of a concurrency-1 level: each client request
    is matched to the trace that started inside it. ``outside`` is the client's latency minus
    the server's (gRPC, the client library), ``between steps`` the server's time outside any
    step (the ensemble scheduler and the tensor copies between steps). Stops when fewer than
    99% of a kind's requests have a trace."""
    starts = [t.start_ns for t in traces]
    rows = []
    for kind, requests in done.items():
        matched = []
        for r in requests:
            i = bisect.bisect_left(starts, r[3])
            if i < len(traces) and starts[i] <= r[4]:
                matched.append((r[1], r[2], traces[i]))
        if len(matched) < 0.99 * len(requests):  # another clock, or traces lost: say so
            raise SystemExit(
                f"--trace: only {len(matched):,} of {len(requests):,} {kind} requests have a trace"
            )
        for surface in ("home", "search", "related"):
            group = [(ms, t) for s, ms, t in matched if s == surface]
            if len(group) < 100:
                continue
            ms = np.asarray([g[0] for g in group])
            p40, p60, p99 = np.percentile(ms, [40, 60, 99])
            for band, keep in (("p40-p60", (ms >= p40) & (ms <= p60)), ("slowest 1%", ms >= p99)):
                picked = [g for g, k in zip(group, keep, strict=True) if k]
                parts: dict[str, float] = {"client": float(np.mean([g[0] for g in picked]))}
                parts["outside"] = parts["client"] - float(np.mean([t.total_ms for _, t in picked]))
                for step in steps:
                    for part in ("queue_ms", "compute_ms"):
                        parts[f"{step} {part[:-3]}"] = float(
                            np.mean(
                                [
                                    sum(getattr(x, part) for x in t.steps if x.model == step)
                                    for _, t in picked
                                ]
                            )
                        )
                parts["between steps"] = float(
                    np.mean(
                        [
                            t.total_ms - sum(x.queue_ms + x.compute_ms for x in t.steps)
                            for _, t in picked
                        ]
                    )
                )
                rows.append(
                    {
                        "traffic": kind,
                        "surface": surface,
                        "band": band,
                        "requests": len(picked),
                        "of": len(group),
                        **{k: round(v, 3) for k, v in parts.items()},
                    }
                )
    return rows


def _step_stats(client, models: list[str]) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    out = {}
    for name in models:
        stats = client.get_inference_statistics(name, as_json=True)["model_stats"]
        agg = {"count": 0, "queue_ns": 0, "compute_ns": 0}
        for s in stats:
            inf = s["inference_stats"]
            agg["count"] += int(inf["success"].get("count", 0))
            agg["queue_ns"] += int(inf["queue"].get("ns", 0))
            parts = ("compute_input", "compute_infer", "compute_output")
            agg["compute_ns"] += sum(int(inf[k].get("ns", 0)) for k in parts)
        out[name] = agg
    return out


def _per_request_ms(before: dict, after: dict) -> dict[str, dict[str, float]]:
    out = {}
    for name in after:
        n = after[name]["count"] - before[name]["count"]
        out[name] = {
            k.replace("_ns", "_ms"): (after[name][k] - before[name][k]) / max(n, 1) / 1e6
            for k in ("queue_ns", "compute_ns")
        }
    return out


SERVE_FIELDS = (
    "instances",
    "door_instances",
    "max_batch_size",
    "batch_delay_us",
    "max_queue_size",
    "queue_timeout_ms",
    "max_inflight",
    "generative_depth",
)


def _apply_serving(repo: Path, args: argparse.Namespace) -> None:
    """Serves a reused repository with this run's step settings (instances, batching, queue
    bounds, the search settings: HNSW's beam, IVF's cells probed, the refine factor): they live
    in the definitions and each step's serving.json, not in the assets, so they change without
    a rebuild. A repository whose assets this code would not write is refused."""

    from candgen.endpoint.export import repository_definitions
    from candgen.serving.query_encoder import QUERY_ENCODER_DIR
    from candgen.serving.steps import STEPS, FeaturesStep, read_serving_file, write_serving_file

    if not (repo / FeaturesStep.MODEL / "1" / QUERY_ENCODER_DIR).is_dir():
        raise SystemExit(
            f"--reuse-repository: {repo} was built by other code "
            f"({FeaturesStep.MODEL}/1/{QUERY_ENCODER_DIR}/ is missing); "
            "run without --reuse-repository to rebuild it"
        )
    settings = {name: getattr(args, name) for name in SERVE_FIELDS}
    serving = None
    for folder in [repo / step.MODEL / "1" for step in STEPS] + [repo / "retrieve" / "1"]:
        config, index, provenance = read_serving_file(folder)
        serving = dataclasses.replace(config, **settings)
        searched = {name: getattr(args, name) for name in SEARCH_SETTINGS}
        index = dataclasses.replace(index, **searched)
        write_serving_file(folder, serving, index, provenance)
    for name, text in repository_definitions(1, serving).items():
        (repo / name).write_text(text)


def _build_args(args: argparse.Namespace) -> dict[str, object]:
    """What the built repository depends on (a reused one must have been built with these)."""
    names = ("ads", "dim", "text_dim", "seed", "ef_construction", "ad_index", "content_index")
    names += ("max_len", "encoder_block_scale", "query_encoder_precision", "feature_port")
    names += ("generative",)
    return {n: getattr(args, n) for n in names} | {
        "ad_text": f"minilm {AD_TEXTS} {TEXT_SPREAD}, categories apart",
        "constraints": "market + 1M-ad marketplace targeting, issue 15",
        **({"generative_model": GENERATIVE_TRANSDUCER} if args.generative else {}),
    }


def _index_name(index: AdIndex, built: str) -> str:
    """An index (``built``: its --ad-index or --content-index name) and its search settings, as
    the stages name them."""
    if index.kind == "hnsw":
        return f"HNSW efSearch={index.config.ef_search}"
    refined = _built(built)["refine"] != "none"
    refine = f", refine x {index.config.refine_factor}" if refined else ""
    return f"{built}, nprobe={index.config.nprobe}{refine}"


def _query_generator_stage(
    args: argparse.Namespace, work: Path, logged: list[str]
) -> dict[str, object]:
    """The query generator's search alone: the logged queries' embeddings (the served int8
    encoder) against the ads' text index at the served beam, recall against exact search."""
    from candgen.serving.steps import (
        CONTENT_DIR,
        FeaturesStep,
        GeneratorsStep,
        load_query_encoder,
        read_serving_file,
    )

    version = work / "repo"
    features = version / FeaturesStep.MODEL / "1"
    encoder = load_query_encoder(features, read_serving_file(features)[0])
    rng = np.random.default_rng(args.seed)
    n = min(args.latency_queries, len(logged))
    texts = [logged[i] for i in rng.choice(len(logged), n, replace=False)]
    qs = np.stack([encoder.encode(t) for t in texts]).astype(np.float32)
    folder = version / GeneratorsStep.MODEL / "1" / CONTENT_DIR
    from scale import exact_top_k

    from candgen.index.ann import VectorFile
    from candgen.serving.generators import TEXT_FILE, ContentGenerator

    # As the generators step loads it: the version's search settings.
    index = read_serving_file(version / GeneratorsStep.MODEL / "1")[1]
    served = ContentGenerator.load(folder, index.searching())
    rows = exact_top_k(VectorFile(folder / TEXT_FILE), qs, K)
    truth = list(served.text.ids[rows])
    ann = served.index
    return {
        "stage": f"query generator: ad text {_index_name(ann, args.content_index)} as "
        f"served, {len(texts)} logged search queries",
        "recall@100": recall_at_k(ann.search(qs, K)[0], truth),
        **latency_ms(ann, qs),
    }


def prepare(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The marketplace, its Feast store and feature server (not started), and the repository
    (built, or reused with ``--reuse-repository``): (work, store, users, items, logged queries,
    feature server, build info, reused, ad ids, ad vectors)."""
    import shutil

    from candgen.features.store import FeatureServerProcess

    work = Path(args.workdir).resolve()
    built = work / "repository_build.json"
    reuse = args.reuse_repository and built.exists() and (work / "repo").exists()
    if reuse:
        stored = json.loads(built.read_text())["args"]
        stored.setdefault("ad_index", "hnsw")  # a run before --ad-index and --content-index
        stored.setdefault("content_index", "hnsw")
        stored.setdefault("generative", False)  # a run before --generative
        for setting in ("instances", "door_instances", "ef_search"):  # see _apply_serving
            stored.pop(setting, None)
        if stored != _build_args(args):
            raise SystemExit(f"--reuse-repository: {work / 'repo'} was built with other settings")
    if not reuse:
        built.unlink(missing_ok=True)
        shutil.rmtree(work / "repo", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store, users, items, market_ads, logged = _market(work, args.seed, args.online)
    print(
        f"marketplace + Feast store: {len(users):,} users in {time.perf_counter() - t0:.0f}s",
        flush=True,
    )
    features = FeatureServerProcess(
        store, args.feature_port, work / "feature_server.log", args.feature_server == "lean"
    )
    if reuse:
        build = json.loads(built.read_text())["build"]
        everything, ad_ids = _corpus_ids(args, items, market_ads)
        vectors = everything[len(items) :]
        del everything
    else:
        build, ad_ids, vectors = _build_repository(args, work, items, market_ads, features.url)
        built.write_text(json.dumps({"args": _build_args(args), "build": build}))
    _apply_serving(work / "repo", args)
    print(f"repository{' (reused)' if reuse else ''}: {build}", flush=True)
    return work, store, users, items, logged, features, build, reuse, ad_ids, vectors


def stage_ensemble(args: argparse.Namespace) -> dict[str, object]:
    from scale import process_tree_mb

    from candgen.endpoint.client import RetrieveClient
    from candgen.endpoint.runtime import ServerConfig, start, stop
    from candgen.features.client import FeatureServerClient
    from candgen.serving.pipeline import user_context, user_vector
    from candgen.serving.steps import ENSEMBLE, STEPS, load_retriever

    work, _, users, items, logged, features, build, reuse, ad_ids, vectors = prepare(args)
    trace_file = work / "trace.json"
    for part in trace_parts(trace_file):  # a trace is written in parts: none of the last run's
        part.unlink()
    server = ServerConfig(
        model_repository=str(work / "repo"),
        state_dir=str(work / "triton"),
        trace_file=str(trace_file) if args.trace else "",
        trace_rate=1,
        http_port=args.http_port,
        grpc_port=args.http_port + 1,
        metrics_port=args.http_port + 2,
        ready_timeout_s=600,
    )
    grpc_url = f"127.0.0.1:{args.http_port + 1}"
    levels, profile = [], {}
    try:
        features.start()
        t0 = time.perf_counter()
        server_pid = int(start(server)["pid"])  # type: ignore[call-overload]
        load_s = time.perf_counter() - t0
        memory = {"loaded": process_tree_mb(server_pid)}
        print(f"tritonserver ready in {load_s:.0f}s: {memory['loaded']}", flush=True)
        stats_client = RetrieveClient(grpc_url, "grpc").client
        models = [s.MODEL for s in STEPS] + [ENSEMBLE]
        sent: set[str] = set()
        fresh = itertools.count()
        traffic = {kind: Traffic(kind, logged, items, sent, fresh) for kind in TRAFFIC}
        _load(grpc_url, users, 5.0, 2, args.seed, [traffic["logged context"]])  # warm-up
        # Concurrency 1 sends the three kinds interleaved, ten times as long (for the p99
        # comparison's block bootstrap); the profile of that level is the mix's.
        first, *rest = args.concurrency
        plan = [(list(TRAFFIC), first, 10 * args.seconds)]
        plan += [([kind], c, args.seconds) for kind in TRAFFIC[:2] for c in rest]
        windows = []  # per level: its rows and when it ran (monotonic ns, the trace's clock)
        for kinds, c, seconds in plan:
            before = _step_stats(stats_client, models)
            since_ns = time.monotonic_ns()
            got = _load(grpc_url, users, seconds, c, args.seed + c, [traffic[k] for k in kinds])
            windows.append((got, since_ns, time.monotonic_ns()))
            name = f"{c} ({' + '.join(kinds) if len(kinds) < len(TRAFFIC) else 'all kinds'})"
            profile[name] = _per_request_ms(before, _step_stats(stats_client, models))
            if c == first:
                done = {level["traffic"]: level["_requests"] for level in got}
                traced = done
                rises = {
                    f"{kind}{', search only' if surface else ''}": p99_rise(
                        done[kind], done[TRAFFIC[0]], args.seed, surface
                    )
                    for kind in TRAFFIC[1:]
                    for surface in ("", "search")
                }
            for level in got:
                level.pop("_requests")
            levels += got
            print(got, profile[name], flush=True)
        # The same user vectors the encoder step computes, for ANN-only and exact search.
        lookup = FeatureServerClient(features.url, timeout_s=2.0)
        rng = np.random.default_rng(args.seed)
        sample = users[rng.choice(len(users), min(args.queries, len(users)), replace=False)]
        t0 = time.perf_counter()
        contexts = [user_context(lookup, int(u)) for u in sample]
        feature_ms = (time.perf_counter() - t0) * 1e3 / len(sample)
        memory["after_load"] = process_tree_mb(server_pid)
        print(f"server memory after the load: {memory['after_load']}", flush=True)
    finally:
        stop(server)
        features.stop()
    traces = read_trace(trace_file) if args.trace else []
    tail = trace_tail(traces, traced, [s.MODEL for s in STEPS]) if args.trace else []
    for rows, since_ns, until_ns in windows if args.trace else []:
        server = server_side(traces, since_ns, until_ns, len(STEPS))
        for row in rows:
            row.update(server)
        print(f"concurrency {rows[0]['concurrency']} in the server: {server}", flush=True)
    for row in tail:
        print(row, flush=True)
    retriever = load_retriever(work / "repo" / STEPS[1].MODEL / "1")
    qs = np.stack([v for c in contexts if (v := user_vector(retriever, c)) is not None])
    del retriever
    served = index_config(args.ad_index, args)
    ann = AdIndex.load(work / "repo" / STEPS[2].MODEL / "1" / "ads.faiss", served)
    exact = AdIndex.build(ad_ids, vectors, IndexConfig(kind="flat"))
    truth = exact.search(qs, K)[0]
    stages = []
    if ann.kind == "hnsw":
        sweep = [{"ef_search": ef} for ef in sorted({args.ef_search, 128, 256, 512, 1024})]
        served_setting = {"ef_search": args.ef_search}
    else:
        sweep = [{"nprobe": n} for n in sorted({args.nprobe, 8, 16, 32, 64})]
        served_setting = {"nprobe": args.nprobe}
    for setting in sweep:
        ann.config = dataclasses.replace(served, **setting)
        stages.append(
            {
                "stage": f"ANN only ({_index_name(ann, args.ad_index)})"
                + (" (served)" if setting == served_setting else ""),
                "recall@100": recall_at_k(ann.search(qs, K)[0], truth),
                **latency_ms(ann, qs),
            }
        )
    stages.append(
        {
            "stage": "exact search only (flat IP)",
            "recall@100": 1.0,
            **latency_ms(exact, qs[: args.latency_queries]),
        }
    )
    del ann, exact
    stages.append(_query_generator_stage(args, work, logged))
    print(stages, flush=True)
    by = {(r["traffic"], r["concurrency"]): r["p99_ms"] for r in levels}
    rise_unseen, rise_logged = rises["unseen queries"], rises["logged context"]
    # issue 14's and 16's figures are the 1M run's (10M: main), without the generative generator
    if args.ads < SCALE_ADS and not args.generative:
        write_headline(
            {
                "context.query_encoder_p99_ms_added": {
                    "value": round(rise_unseen["rise_ms"], 2),
                    "target": "<= 5",
                    "met": bool(rise_unseen["rise_ms"] <= 5.0),
                    "how": f"p99 at concurrency 1 of the live ensemble ({args.ads:,} ads, gRPC, "
                    "home/search/related at random), every search query unseen (each a cache miss "
                    f"of the {args.query_encoder_precision} query encoder, then the query "
                    "generator's search; related requests carry their item) minus the p99 of "
                    "requests without context, interleaved with them: "
                    f"{by['unseen queries', 1]:.2f} - {by['no context', 1]:.2f} ms; "
                    "90% block-bootstrap interval "
                    f"{rise_unseen['low_ms']:+.2f} to {rise_unseen['high_ms']:+.2f} "
                    f"({rise_unseen['windows']} windows of 10 s). Searches alone "
                    f"{rises['unseen queries, search only']['rise_ms']:+.2f} ms; with the log's "
                    f"queries (repeats hit the cache) {rise_logged['rise_ms']:+.2f} ms "
                    f"({rise_logged['low_ms']:+.2f} to {rise_logged['high_ms']:+.2f}). "
                    f"`python benchmarks/serving.py {' '.join(sys.argv[1:])}`",
                }
            }
        )
        write_headline(serving_headline(args, levels, stages))
    return {
        "levels": levels,
        "p99_rise_at_1": rises,
        "trace_tail_at_1": tail,
        "profile": profile,
        "stages": stages,
        "feature_lookup_ms": feature_ms,
        "queries": len(qs),
        "ads": args.ads,
        "dim": args.dim,
        "text_dim": args.text_dim,
        "ad_text": f"MiniLM embeddings of {AD_TEXTS:,} marketplace ad texts, each the centre "
        f"of {args.ads // AD_TEXTS:,} ads' vectors at cosine about 0.95",
        "query_encoder_precision": args.query_encoder_precision,
        "logged_queries": len(logged),
        "repository_reused": reuse,
        "instances": args.instances,
        "door_instances": args.door_instances,
        "encoder_block_scale": args.encoder_block_scale,
        "generative": args.generative,
        "generative_depth": args.generative_depth if args.generative else 0,
        "note": (
            f"With the generative generator: the encoder step also runs a random-weight "
            f"{GENERATIVE_TRANSDUCER} and beam search (width {args.generative_depth}) over the "
            f"semantic IDs of the {args.ads:,} ads ({build.get('generative_ids_levels')} "
            f"tokens, vocabularies {build.get('generative_vocab_sizes')}), writing "
            f"{args.generative_depth} ads per request, which the generators step filters; the "
            "fixed quotas give it no slots, so the answers are those of a version without it "
            "and the cost is all it adds"
        )
        if args.generative
        else "",
        "ef_construction": args.ef_construction,
        "ef_search": args.ef_search,
        "seconds_per_level": args.seconds,
        "feature_server": args.feature_server,
        "online": args.online,
        "server_load_s": load_s,
        "server_memory": memory,
        "ad_index": args.ad_index,
        "content_index": args.content_index,
        "nprobe": args.nprobe,
        "refine_factor": args.refine_factor,
        **build,
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), Triton "
        "2.51 (nvidia-pytriton 0.7.0) python backend, CPU",
        "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:]),
    }


FEATURE_BATCHES = (1, 8, 32)
# What stands in front of the online store in an ensemble run (--feature-server).
FRONTS = {
    "lean": "features through the lean online-read front (features serve --lean)",
    "feast": "features through the Feast feature server",
}


def _feast_read(feast, refs: list[str], ids: list[int]) -> object:  # type: ignore[no-untyped-def]
    rows = [{"user_id": i} for i in ids]
    return feast.get_online_features(features=refs, entity_rows=rows).to_dict()


def stage_features(args: argparse.Namespace) -> dict[str, object]:
    """The user feature read alone, for the serving path's choice: through the Feast feature
    server (HTTP, one kept-alive connection) one user per call and a batch per call, and Feast's
    own online read in-process (``get_online_features``, no HTTP) for reference; over the SQLite
    and the Redis online store. The features step reads its batch with one call."""
    from candgen.features.client import FeatureServerClient
    from candgen.features.store import FeatureServerProcess, open_store, service_feature_refs
    from candgen.serving.pipeline import USER_SERVICE

    work = Path(args.workdir).resolve() / "features_stage"
    refs = service_feature_refs(USER_SERVICE)
    rng = np.random.default_rng(args.seed)
    rows = []
    for online in ("sqlite", "redis"):
        store, users, *_ = _market(work, args.seed, online)
        server = FeatureServerProcess(store, port=args.feature_port, log=work / "server.log")
        server.start()
        try:
            client = FeatureServerClient(server.url, 2.0, {USER_SERVICE: refs})
            feast = open_store(store)
            for batch in FEATURE_BATCHES:
                calls = [
                    [int(u) for u in users[rng.integers(len(users), size=batch)]]
                    for _ in range(max(50, args.latency_queries // 2))
                ]

                reads = {
                    "feature server (HTTP)": partial(client.lookup_many, USER_SERVICE, "user_id"),
                    "Feast in-process": partial(_feast_read, feast, refs),
                }
                for how, read in reads.items():
                    read(calls[0])  # warm: the first read opens the store
                    times = []
                    for ids in calls:
                        t0 = time.perf_counter()
                        read(ids)
                        times.append((time.perf_counter() - t0) * 1e3)
                    p50, p99 = np.percentile(times, [50, 99])
                    rows.append(
                        {
                            "online": online,
                            "how": how,
                            "batch": batch,
                            "calls": len(calls),
                            "p50_ms": float(p50),
                            "p99_ms": float(p99),
                            "per_user_ms": float(np.mean(times)) / batch,
                        }
                    )
                    print(rows[-1], flush=True)
        finally:
            server.stop()
    return {
        "rows": rows,
        "features": refs,
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
        "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:]),
    }


def render_features(results: dict[str, dict]) -> str:
    lines = [
        "## Serving: the user feature read (`benchmarks/serving.py --stage features`)",
        "",
        "The features step's read of `user_serving_v3` for the users of one batch: through the "
        "Feast feature server (HTTP on one kept-alive connection; what the step does, one call "
        "per batch), and Feast's own online read in the calling process for reference (not "
        "possible in the Triton runtime, whose numpy 1.x Feast does not support). 2,000 users "
        "of the benchmark's marketplace; ms per call.",
        "",
    ]
    for machine, res in sorted(results.items()):
        lines += [
            f"### {res['machine']} (`{machine}`)",
            "",
            "| online store | read | users per call | calls | p50 | p99 | mean per user |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            lines.append(
                f"| {r['online']} | {r['how']} | {r['batch']} | {r['calls']} | "
                f"{r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['per_user_ms']:.3f} ms |"
            )
        lines += ["", f"Command: `{res['command']}`", ""]
    return "\n".join(lines)


def serving_headline(
    args: argparse.Namespace, levels: list[dict], stages: list[dict]
) -> dict[str, dict]:
    """Issue 16's figures: p99 at the first (lowest) concurrency without context, the best
    throughput at p99 <= 50 ms with no error and no rejection, the served ANN recall@100, and
    the overload level's p99 of answered requests (errors there only as rejections)."""
    command = f"`python benchmarks/serving.py {' '.join(sys.argv[1:])}`"
    where = (
        f"live ensemble, {args.ads:,} ads x {args.dim}, gRPC, K = {K}, "
        f"{FRONTS[args.feature_server]} on {args.online}, "
        f"load generator on the same {os.cpu_count()} cores; "
        f"max_batch_size {args.max_batch_size}, batch delay {args.batch_delay_us} us, "
        f"queue {args.max_queue_size} / {args.queue_timeout_ms} ms, "
        f"at most {args.max_inflight} requests in flight, "
        f"{args.door_instances} instance(s) at the door, {args.instances} per later step"
    )
    first = min(args.concurrency)
    c1 = next(r for r in levels if r["concurrency"] == first and r["traffic"] == TRAFFIC[0])
    alone = [r for r in levels if not r["interleaved_with"]]
    mixed = [r for r in levels if r["interleaved_with"]]
    if mixed:  # the first level, all kinds interleaved: judged as one (its worst kind's p99)
        worst_kind = max(mixed, key=lambda r: r["p99_ms"])
        whole = {
            **worst_kind,
            "traffic": "all kinds interleaved",
            "qps": worst_kind["level_qps"],
            "errors": sum(r["errors"] for r in mixed),
            "rejected": sum(r["rejected"] for r in mixed),
        }
        alone = [whole, *alone]
    fit = [r for r in alone if r["p99_ms"] <= 50 and not r["errors"] and not r["rejected"]]
    best = max(fit, key=lambda r: r["qps"]) if fit else None
    top = max(args.concurrency)
    over = [r for r in alone if r["concurrency"] == top and not r.get("interleaved_with")]
    served = next(r for r in stages if r["stage"].endswith("(served)"))
    out = {
        "serving.p99_ms_c1": {
            "value": round(c1["p99_ms"], 2),
            "target": "<= 10",
            "met": bool(c1["p99_ms"] <= 10),
            "how": f"p99 at concurrency {first} of requests without context (p50 "
            f"{c1['p50_ms']:.2f} ms; {c1['requests']:,} requests interleaved with the other "
            f"kinds); {where}. {command}",
        },
        "serving.best_qps_p99_le_50ms": {
            "value": round(best["qps"], 1) if best else 0,
            "target": ">= 800",
            "met": bool(best and best["qps"] >= 800),
            "how": (
                f"{best['traffic']} at concurrency {best['concurrency']}: p99 "
                f"{best['p99_ms']:.1f} ms, 0 errors, 0 rejections"
                if best
                else "no level had p99 <= 50 ms without errors"
            )
            + f"; {where}. {command}",
        },
        "serving.ann_recall100": {
            "value": round(served["recall@100"], 4),
            "target": ">= 0.95",
            "met": bool(served["recall@100"] >= 0.95),
            "how": f"{served['stage']} against exact search on the ensemble's own user vectors; "
            f"{command}",
        },
    }
    if over:
        worst = max(over, key=lambda r: r["p99_ms"])
        out["serving.overload_p99_ms"] = {
            "value": round(worst["p99_ms"], 1),
            "target": "<= 100, errors only as explicit rejections",
            "met": bool(all(r["p99_ms"] <= 100 and not r["errors"] for r in over)),
            "how": "; ".join(
                f"{r['traffic']} at concurrency {top}: p99 of answered {r['p99_ms']:.1f} ms "
                + (
                    f"(in the server, from arrival to answer: {r['server_p99_ms']:.1f} ms) "
                    if "server_p99_ms" in r
                    else ""
                )
                + f"({r['requests']:,} answered, {r['qps']:.0f} QPS), {r['rejected']:,} rejected "
                f"as busy (UNAVAILABLE, p99 {r['rejected_p99_ms']:.1f} ms to the refusal), "
                f"{r['errors']} other errors"
                for r in over
            )
            + f"; {where}. {command}",
        }
    return out


def _instances(res: dict) -> str:
    """A stored run's instance counts (runs before door_instances had one count for all)."""
    if "door_instances" not in res:
        return f"{res['instances']} instance(s) per step"
    return f"{res['door_instances']} instance(s) at the door, {res['instances']} per later step"


def _server_p99(level: dict) -> str:
    """The level's server-side p99 (``--trace``), over every kind the level sent."""
    if "server_p99_ms" not in level:
        return "not traced"
    return f"{level['server_p99_ms']:.1f} ms"


def _qps(level: dict) -> str:
    """A level's QPS; where kinds were interleaved, this kind's share of the level's."""
    if level.get("interleaved_with"):
        return f"{level['qps']:.0f} of {level['level_qps']:.0f}"
    return f"{level['qps']:.0f}"


def _levels(res: dict, kind: str) -> list[dict]:
    """The levels of one kind of traffic (runs stored before there were kinds had none)."""
    return [r for r in res["levels"] if r.get("traffic", TRAFFIC[0]) == kind]


def _profile(res: dict, concurrency: int, kind: str) -> dict[str, dict[str, float]]:
    """A level's per-step profile; concurrency 1 sends all kinds at once (the mix's profile)."""
    profile: dict[str, dict[str, dict[str, float]]] = res["profile"]
    for name in (f"{concurrency} ({kind})", f"{concurrency} (all kinds)", str(concurrency)):
        if name in profile:
            return profile[name]
    raise KeyError(f"no profile for concurrency {concurrency}")


def plot_ensemble(machine: str, res: dict) -> str:
    """Latency and throughput by concurrency, and where a request's time goes; returns the PNG's
    path relative to docs/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    levels = _levels(res, TRAFFIC[0])
    cs = [r["concurrency"] for r in levels]
    for q in ("p50", "p95", "p99"):
        ax1.plot(cs, [r[f"{q}_ms"] for r in levels], marker="o", label=q)
    with_context = _levels(res, TRAFFIC[1])
    if with_context:
        ax1.plot(
            [r["concurrency"] for r in with_context],
            [r["p99_ms"] for r in with_context],
            marker="x",
            ls=":",
            label="p99, logged context",
        )
    ax1.axhline(20, color="grey", ls="--", lw=1, label="p99 target at c=1")
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="concurrency",
        ylabel="ms",
        title="ensemble latency",
        xticks=cs,
        xticklabels=[str(c) for c in cs],
    )
    ax1.legend()
    ax2.bar([str(c) for c in cs], [r["qps"] for r in levels])
    ax2.axhline(200, color="grey", ls="--", lw=1, label="target")
    ax2.set(xlabel="concurrency", ylabel="requests / s", title="throughput")
    ax2.legend()
    profiles = [_profile(res, c, TRAFFIC[0]) for c in cs]
    steps = [m for m in profiles[0] if m != "retrieve"]
    bottom = np.zeros(len(cs))
    for color, step in zip(plt.cm.tab10.colors, steps, strict=False):
        for part, hatch in (("compute_ms", ""), ("queue_ms", "//")):
            vals = np.array([profile[step][part] for profile in profiles])
            label = f"{step.removeprefix('candgen_')} {part[:-3]}"
            ax3.bar(
                [str(c) for c in cs],
                vals,
                bottom=bottom,
                hatch=hatch,
                color=color,
                edgecolor="white",
                label=label,
            )
            bottom += vals
    ax3.set(xlabel="concurrency", ylabel="ms per request", title="time per step (Triton stats)")
    ax3.legend(fontsize=7)
    fig.tight_layout()
    out = RESULTS / f"serving_ensemble_{machine}.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return f"benchmarks/{out.name}"


def render_ensemble(results: dict[str, dict]) -> str:
    lines = [
        "## Serving: the whole ensemble (`benchmarks/serving.py --stage ensemble`)",
        "",
        "Requests go over gRPC to the live `retrieve` ensemble (features read through the "
        "run's front, below, beside the search query's embedding -> HSTU user encoder -> "
        "generators over the run's ads: sequential, content, popularity, and query (search) "
        "and item (related) where the request has that context -> quotas), "
        "K = 100, users and surfaces drawn at random; the load generator runs on the same "
        "machine. Targets (issue 4, this 2-core machine): ANN recall@100 >= 0.95, p99 <= 20 "
        "ms at concurrency 1, >= 200 QPS at the best concurrency; (issue 14) the query "
        "encoder in the path adds at most 5 ms to p99 at concurrency 1; (issue 16) p99 <= 10 ms "
        "at concurrency 1, >= 800 QPS at p99 <= 50 ms, and at concurrency 64 answered requests' "
        "p99 <= 100 ms with errors only as explicit rejections (*rejected (busy)*: UNAVAILABLE; "
        f"a rejected client waits {BACKOFF_S * 1e3:.0f} ms before its next request). "
        "Traffic: *no context* "
        "sends neither query nor context item; *logged context* sends search queries drawn "
        "from the marketplace's log (repeats hit the query encoder's cache) and related "
        "context items; *unseen queries* makes every search query new (each a cache miss). "
        "Each profile and the change it drove: [serving_notes.md](benchmarks/serving_notes.md).",
        "",
    ]
    for machine, res in sorted(results.items()):
        lines += [
            f"### {res['ads']:,} ads x {res['dim']}; {res['machine']} (`{machine}`)",
            "",
            f"Encoder block scale {res.get('encoder_block_scale', 1.0)}; ads' text vectors "
            f"{res.get('text_dim', res['dim'])}-d ({res.get('ad_text', 'a random mixture')}); "
            "query encoder "
            f"{res.get('query_encoder_precision', 'not in the path')}"
            + (f". {res['note']}" if res.get("note") else "")
            + ".",
            "",
            "| traffic | concurrency | requests | search queries (seen before) | errors | "
            "rejected (busy) | fallback answers | QPS | p50 | p95 | p99 | p99 in the server |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["levels"]:
            seen = (
                f"{r['queries']:,} ({r['repeated_queries']:,})" if "queries" in r else "none sent"
            )
            lines.append(
                f"| {r.get('traffic', TRAFFIC[0])} | {r['concurrency']} | {r['requests']:,} | "
                f"{seen} | {r['errors']} | {r.get('rejected', 'not counted')} | "
                f"{r.get('fallbacks', 'not counted')} | "
                f"{_qps(r)} | {r['p50_ms']:.1f} ms | {r['p95_ms']:.1f} ms | "
                f"{r['p99_ms']:.1f} ms | {_server_p99(r)} |"
            )
        if res.get("p99_rise_at_1"):
            rises = [
                f"{kind} {r['rise_ms']:+.2f} ms (90% bootstrap interval {r['low_ms']:+.2f} to "
                f"{r['high_ms']:+.2f})"
                for kind, r in res["p99_rise_at_1"].items()
            ]
            lines += ["", "p99 at concurrency 1 over *no context*: " + "; ".join(rises) + "."]
        if res.get("trace_tail_at_1"):
            steps = [k[: -len(" queue")] for k in res["trace_tail_at_1"][0] if k.endswith(" queue")]
            lines += [
                "",
                "Where the time went at concurrency 1 (Triton's trace of every request, `--trace`; "
                "mean ms of the middle 20% of each group and of its slowest 1%; each step as "
                "queue + compute; *outside* is gRPC and the client, *between* the server's time "
                "outside the steps, negative where a step's span ends after the next step was "
                "queued):",
                "",
                "| traffic | surface | band | requests | client | outside | "
                + " | ".join(steps)
                + " | between |",
                "|---|---|---|---|---|---|" + "---|" * (len(steps) + 1),
            ]
            for r in res["trace_tail_at_1"]:
                lines.append(
                    f"| {r['traffic']} | {r['surface']} | {r['band']} | {r['requests']} | "
                    f"{r['client']:.1f} | {r['outside']:.1f} | "
                    + " | ".join(f"{r[f'{s} queue']:.1f} + {r[f'{s} compute']:.1f}" for s in steps)
                    + f" | {r['between steps']:.1f} |"
                )
        lines += [
            "",
            "Each stage alone, on the same user vectors "
            f"({res['queries']:,} users, one query at a time):",
            "",
            "| stage | recall@100 | p50 | p95 | p99 |",
            "|---|---|---|---|---|",
        ]
        for r in res["stages"]:
            lines.append(
                f"| {r['stage']} | {r['recall@100']:.4f} | {r['p50_ms']:.2f} ms | "
                f"{r['p95_ms']:.2f} ms | {r['p99_ms']:.2f} ms |"
            )
        lines.append(
            f"| Feast feature server lookup (HTTP) | - | {res['feature_lookup_ms']:.2f}"
            " ms (mean) | | |"
        )
        lines += [
            "",
            "Profile: per request, time in each step's queue and compute (Triton "
            "statistics; the ensemble row is the whole request inside the server):",
            "",
            "| concurrency | " + " | ".join(_profile(res, 1, TRAFFIC[0])) + " |",
            "|---|" + "---|" * len(_profile(res, 1, TRAFFIC[0])),
        ]
        for c, steps in res["profile"].items():
            lines.append(
                f"| {c} | "
                + " | ".join(
                    f"{v['queue_ms']:.2f} + {v['compute_ms']:.2f} ms" for v in steps.values()
                )
                + " |"
            )
        lines += ["", f"![latency, throughput and time per step]({plot_ensemble(machine, res)})"]
        if "server_memory" in res:
            memory = res["server_memory"]["after_load"]
            peaks = sorted(memory["peak_mb_by_process"].items(), key=lambda kv: -kv[1])
            lines += [
                "",
                "Peak resident memory of each server process over the run (VmHWM; "
                f"{memory['processes']} processes, {memory['summed_peaks_mb'] / 1024:.2f} GiB "
                "together): "
                + ", ".join(f"{k.split()[1]} {v / 1024:.2f} GiB" for k, v in peaks)
                + ".",
            ]
        lines += [
            "",
            f"Build: sequential {res.get('ad_index', 'hnsw')} {res['seq_index_build_s']:.0f} s, "
            f"content (and query) {res.get('content_index', 'hnsw')} "
            f"{res['content_index_build_s']:.0f} s; server ready in "
            f"{res['server_load_s']:.0f} s; {_instances(res)}, "
            f"{res['seconds_per_level']:.0f} s per level; "
            f"{FRONTS[res.get('feature_server', 'feast')]} on {res.get('online', 'sqlite')}. "
            f"Command: `{res['command']}`",
            "",
        ]
    return "\n".join(lines)


def render(results: dict[str, dict]) -> str:
    lines = [
        "## Serving: index stage (`benchmarks/serving.py --stage index`)",
        "",
        "Synthetic ads: a mixture of 1,000 Gaussian clusters, L2-normalised, inner product; "
        "queries are fresh draws from the mixture. Recall@100 is against exact search on the "
        "same queries. Latency is one query at a time (no batching); QPS is one batched "
        "call over all queries. Target (issue 4): ANN recall@100 >= 0.95.",
        "",
    ]
    for machine, res in sorted(results.items()):
        lines += [
            f"### {res['ads']:,} ads x {res['dim']}, {res['queries']:,} queries; "
            f"{res['machine']} (`{machine}`)",
            "",
            "| index | build | recall@100 | p50 | p95 | p99 | QPS (batched) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            lines.append(
                f"| {r['index']} | {r['build_s']:.1f} s | {r['recall@100']:.4f} | "
                f"{r['p50_ms']:.2f} ms | {r['p95_ms']:.2f} ms | {r['p99_ms']:.2f} ms | "
                f"{r['qps_batched']:,.0f} |"
            )
        lines += ["", f"Peak RSS {res['peak_rss_mb']:,.0f} MB. Command: `{res['command']}`", ""]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=["index", "ensemble", "features"], default="index")
    p.add_argument("--ads", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument(
        "--text-dim", type=int, default=384, help="ensemble: ads' text vectors (the query's width)"
    )
    p.add_argument(
        "--query-encoder-precision",
        default="int8",
        choices=PRECISIONS,
        help="ensemble: the query encoder's graph (int8 or fp32, as export writes it)",
    )
    p.add_argument("--queries", type=int, default=1_000)
    p.add_argument("--latency-queries", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--machine", default="cpu")
    p.add_argument("--render-only", action="store_true", help="rewrite the doc from stored runs")
    p.add_argument("--workdir", default="data/bench_serving", help="ensemble: scratch folder")
    p.add_argument("--seconds", type=float, default=20.0, help="ensemble: seconds per level")
    p.add_argument(
        "--generative",
        action="store_true",
        help="ensemble: the version also serves a generative generator (a random-weight "
        f"{GENERATIVE_TRANSDUCER} writing the ads' semantic IDs, fitted on the corpus); its "
        "figures go to the --machine label with -generative added, never to the headline",
    )
    p.add_argument(
        "--trace",
        action="store_true",
        help="ensemble: trace every request (Triton TIMESTAMPS) and report where the slowest "
        "1%% of each kind's requests spent their time at concurrency 1",
    )
    from scale import CONFIGS

    indexes = ["hnsw", *(name for name, c in CONFIGS.items() if c["kind"] == "ivfpq")]
    p.add_argument(
        "--ad-index",
        choices=indexes,
        default="hnsw",
        help="ensemble: the ads index (hnsw, or a compressed index of benchmarks/scale.py)",
    )
    p.add_argument(
        "--content-index",
        choices=[*indexes, *TEXT_INDEXES],
        default="hnsw",
        help="ensemble: the content and query generators' index over the ads' text",
    )
    p.add_argument("--nprobe", type=int, default=IndexConfig().nprobe, help="ensemble: IVF cells")
    p.add_argument(
        "--refine-factor",
        type=int,
        default=IndexConfig().refine_factor,
        help="ensemble: IVF-PQ candidates re-scored per result",
    )
    p.add_argument(
        "--ef-search",
        type=int,
        default=IndexConfig().ef_search,
        help="ensemble: HNSW beam (served)",
    )
    p.add_argument(
        "--ef-construction",
        type=int,
        default=IndexConfig().ef_construction,
        help="ensemble: HNSW build beam",
    )
    from candgen.serving.steps import ServingConfig

    defaults = ServingConfig()
    p.add_argument(
        "--instances",
        type=int,
        default=defaults.instances,
        help="ensemble: instances of each step after the door (ServingConfig.instances)",
    )
    for name, what in (
        ("door_instances", "instances of the first step, the door"),
        ("max_batch_size", "requests one execute of a step takes together"),
        ("batch_delay_us", "how long a step's batcher may wait to fill a batch"),
        ("max_queue_size", "requests a step holds waiting before it rejects more"),
        ("queue_timeout_ms", "a request waiting longer in a step's queue is rejected"),
        ("max_inflight", "requests the ensemble holds at once; the next are refused at the door"),
        ("generative_depth", "ads the generative generator writes (with --generative)"),
    ):
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=getattr(defaults, name),
            help=f"ensemble: {what} (ServingConfig.{name})",
        )
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 4, 16, 32, 64],
        help="ensemble: load levels; the first is sent with every kind of traffic interleaved, "
        "ten times as long; the largest is the overload level",
    )
    p.add_argument(
        "--online",
        choices=["sqlite", "redis"],
        default="sqlite",
        help="ensemble, features: the online store behind the Feast feature server",
    )
    p.add_argument(
        "--reuse-repository",
        action="store_true",
        help="ensemble: serve the repository the last run built in --workdir with the same "
        "settings (the 1M-ad build takes about 15 minutes on 2 cores)",
    )
    p.add_argument("--max-len", type=int, default=50, help="ensemble: encoder history length")
    p.add_argument(
        "--encoder-block-scale",
        type=float,
        default=0.1,
        help="ensemble: scale of the random encoder's block outputs (see _model_file)",
    )
    p.add_argument("--http-port", type=int, default=8100, help="ensemble: +1 gRPC, +2 metrics")
    p.add_argument("--feature-port", type=int, default=6570)
    p.add_argument(
        "--feature-server",
        choices=["feast", "lean"],
        default="lean",
        help="ensemble: the lean online-read front (features serve --lean) or Feast's feature "
        "server in front of the store",
    )
    return p


def main() -> int:
    args = parser().parse_args()
    if args.generative and not args.machine.endswith("-generative"):
        args.machine += "-generative"  # never in place of the run without it
    name = f"serving_{args.stage}_{args.machine}.json"
    if not args.render_only:
        stage = {"index": stage_index, "ensemble": stage_ensemble, "features": stage_features}
        result = stage[args.stage](args)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / name).write_text(json.dumps(result, indent=2))
        if args.stage == "ensemble" and args.ads >= SCALE_ADS and not args.generative:
            from scale import headline

            write_headline(headline())
    for stage, fn in (
        ("index", render),
        ("ensemble", render_ensemble),
        ("features", render_features),
    ):
        stored = {
            f.stem.removeprefix(f"serving_{stage}_"): json.loads(f.read_text())
            for f in sorted(RESULTS.glob(f"serving_{stage}_*.json"))
        }
        if stored:
            write_section(f"serving-{stage}", fn(stored))
    print("wrote docs/BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
