"""Scale benchmark (issue 17): compressed ad indexes on 1M-10M ads, on this machine.

    python benchmarks/scale.py --stage curve --ads 1000000      # every index type, swept
    python benchmarks/scale.py --stage curve --ads 10000000 --configs ivfpq16-sq8,ivfhnsw-pq16-sq8

The corpus is the serving benchmark's (``serving.corpus``: a mixture of 1,000 Gaussian clusters,
L2-normalised, 64-d), written once to a .npy file a million rows at a time, and the queries are
fresh draws from the same mixture (``serving.queries``): near no particular ad, as a user vector
is. Truth is exact inner-product top 100, computed a chunk at a time over the file.

Each index is built in its own process from the file (``AdIndex.build`` over a ``VectorFile``:
trained on a sample, added a chunk at a time; its peak RSS is the build's), saved, and then
loaded in a fresh process that measures what serving would hold: its RSS after loading and
after the searches, the saved bytes per ad, and per search setting (nprobe, refine factor)
recall@100 against exact, single-query latency on one thread (as the generators step runs
FAISS) and batched throughput on every core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_doc import write_headline, write_section  # noqa: E402

from candgen.index.ann import SEARCH_SETTINGS, VectorFile, recall_at_k  # noqa: E402
from serving import corpus, queries  # noqa: E402

RESULTS = ROOT / "docs" / "benchmarks"
K = 100
CHUNK = 1_000_000
AD_ID = 1_000_000_000

# name -> IndexConfig fields (build-time); search settings are swept after loading.
CONFIGS: dict[str, dict[str, object]] = {
    "hnsw32": {"kind": "hnsw", "ef_construction": 200},
    "ivfpq8": {"kind": "ivfpq", "pq_m": 8, "refine": "none"},
    "ivfpq16": {"kind": "ivfpq", "pq_m": 16, "refine": "none"},
    "ivfpq32": {"kind": "ivfpq", "pq_m": 32, "refine": "none"},
    "ivfpq16-sq8": {"kind": "ivfpq", "pq_m": 16, "refine": "sq8"},
    "ivfpq16-fp16": {"kind": "ivfpq", "pq_m": 16, "refine": "fp16"},
    "ivfpq8-sq8": {"kind": "ivfpq", "pq_m": 8, "refine": "sq8"},
    "opq16-ivfpq16-sq8": {"kind": "ivfpq", "pq_m": 16, "opq": True, "refine": "sq8"},
    "ivfhnsw-pq16-sq8": {"kind": "ivfpq", "pq_m": 16, "ivf_quantizer": "hnsw", "refine": "sq8"},
    # 4,096 cells whatever the corpus: at 10M ads the default (4 sqrt(n), 12,649) costs three
    # times the k-means and the assignment of every vector on 2 cores.
    "ivf4k-pq16-fp16": {"kind": "ivfpq", "pq_m": 16, "ivf_nlist": 4096, "refine": "fp16"},
    "ivf4k-pq16-sq8": {"kind": "ivfpq", "pq_m": 16, "ivf_nlist": 4096, "refine": "sq8"},
    "ivf4k-pq32-fp16": {"kind": "ivfpq", "pq_m": 32, "ivf_nlist": 4096, "refine": "fp16"},
    "ivf4k-pq32-sq8": {"kind": "ivfpq", "pq_m": 32, "ivf_nlist": 4096, "refine": "sq8"},
}
NPROBES = (8, 16, 32, 64, 128)
REFINE_FACTORS = (2, 4, 8, 16)
HNSW_EFS = (128, 256, 384)
SERVED_10M = "ivf4k-pq32-fp16"  # the 10M curve's choice: the headline's recall and the runs


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux's VmHWM: getrusage's ru_maxrss
    carries a parent's peak over fork and exec, and read 15.8 GB in every child here)."""
    return _status_mb("VmHWM")


def current_rss_mb() -> float:
    """Resident memory of this process now, MB (Linux)."""
    return _status_mb("VmRSS")


def prepare(work: Path, ads: int, dim: int, n_queries: int, seed: int) -> Path:
    """The corpus file, the queries and their exact top K (written once per size)."""
    folder = work / f"{ads}x{dim}"
    folder.mkdir(parents=True, exist_ok=True)
    vectors_file, truth_file = folder / "vectors.npy", folder / "truth.npy"
    if truth_file.exists():
        return folder
    from tqdm.auto import tqdm

    # corpus() holds the whole array; a million rows at a time go to the file instead.
    out = np.lib.format.open_memmap(vectors_file, "w+", np.float32, (ads, dim))
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1000, dim)).astype(np.float32)
    for lo in tqdm(range(0, ads, CHUNK), desc="corpus", unit="M ads"):
        hi = min(lo + CHUNK, ads)
        chunk = centers[rng.integers(0, 1000, hi - lo)]
        chunk += 0.5 * rng.standard_normal(chunk.shape).astype(np.float32)
        out[lo:hi] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    out.flush()
    del out
    _, small_centers = corpus(10, dim, seed)  # the same centres as serving.corpus(ads, ...)
    assert np.allclose(small_centers, centers)
    qs = queries(centers, n_queries, seed)
    np.save(folder / "queries.npy", qs)
    best_rows = exact_top_k(VectorFile(vectors_file), qs, K)
    np.save(truth_file, AD_ID + 1 + best_rows)
    return folder


def exact_top_k(source: VectorFile, qs: np.ndarray, k: int, progress: bool = True) -> np.ndarray:
    """Each query's exact inner-product top ``k`` rows of a vector file, best first, read
    100,000 rows at a time (a 10M x 384 file is 15 GB)."""
    from tqdm.auto import tqdm

    best_scores = np.full((len(qs), k), -np.inf, np.float32)
    best_rows = np.full((len(qs), k), -1, np.int64)
    step = 100_000  # the block's scores and argpartition: 1.2 GB for 1,000 queries
    for lo in tqdm(range(0, len(source), step), desc=f"exact top {k}", disable=not progress):
        block = source.read(slice(lo, lo + step))
        scores = qs @ block.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if scores.shape[1] > k else None
        cand_scores = np.take_along_axis(scores, top, 1) if top is not None else scores
        cand_rows = (top if top is not None else np.arange(block.shape[0])[None]) + lo
        cand_rows = np.broadcast_to(cand_rows, cand_scores.shape)
        merged_scores = np.concatenate([best_scores, cand_scores], axis=1)
        merged_rows = np.concatenate([best_rows, cand_rows], axis=1)
        keep = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(merged_scores, keep, 1)
        best_rows = np.take_along_axis(merged_rows, keep, 1)
    return best_rows


def build_one(folder: Path, name: str) -> dict[str, object]:
    """Builds and saves one index (in this process, whose peak RSS is the build's)."""
    from candgen.index.ann import AdIndex, IndexConfig

    source = VectorFile(folder / "vectors.npy")
    ids = AD_ID + 1 + np.arange(len(source), dtype=np.int64)
    t0 = time.perf_counter()
    index = AdIndex.build(ids, source, IndexConfig(**CONFIGS[name]), progress=True)  # type: ignore[arg-type]
    build_s = time.perf_counter() - t0
    path = folder / name / "ads.faiss"
    index.save(path)
    return {"build_s": round(build_s, 1), "build_peak_rss_mb": round(rss_mb())}


def serve_one(folder: Path, name: str, latency_queries: int) -> dict[str, object]:
    """Loads one saved index as the generators step would and sweeps its search settings."""
    import faiss

    from candgen.index.ann import AdIndex, IndexConfig, ids_file

    base_rss = current_rss_mb()
    path = folder / name / "ads.faiss"
    build_cfg = CONFIGS[name]
    index = AdIndex.load(path, IndexConfig(**build_cfg))  # type: ignore[arg-type]
    loaded_rss = current_rss_mb()
    n = len(index)
    qs, truth = np.load(folder / "queries.npy"), list(np.load(folder / "truth.npy"))
    settings: list[dict[str, object]]
    if build_cfg["kind"] == "hnsw":
        settings = [{"ef_search": ef} for ef in HNSW_EFS]
    else:
        refined = IndexConfig(**build_cfg).refine != "none"  # type: ignore[arg-type]
        refines = REFINE_FACTORS if refined else (1,)
        settings = [{"nprobe": p, "refine_factor": r} for p in NPROBES for r in refines]
    rows = []
    for setting in settings:
        index.config = IndexConfig(**{**build_cfg, **setting})  # type: ignore[arg-type]
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        index.search(qs[:50], K)  # warm: the first search pages in what the next ones read
        t0 = time.perf_counter()
        found = index.search(qs, K)[0]
        qps = len(qs) / (time.perf_counter() - t0)
        faiss.omp_set_num_threads(1)
        times = []
        for q in qs[:latency_queries]:
            t0 = time.perf_counter()
            index.search(q[None], K)
            times.append((time.perf_counter() - t0) * 1e3)
        p50, p99 = np.percentile(times, [50, 99])
        rows.append(
            {
                **setting,
                "recall@100": round(recall_at_k(found, truth), 4),
                "p50_ms": round(float(p50), 3),
                "p99_ms": round(float(p99), 3),
                "qps_batched": round(qps, 1),
            }
        )
        print(name, rows[-1], flush=True)
    saved = path.stat().st_size + ids_file(path).stat().st_size
    return {
        "ads": n,
        "bytes_per_ad_saved": round(saved / n, 1),
        "load_rss_mb": round(loaded_rss - base_rss),
        "serve_rss_mb": round(current_rss_mb()),
        "serve_peak_rss_mb": round(rss_mb()),
        "rows": rows,
    }


def _child(stage: str, args: argparse.Namespace, name: str) -> dict[str, object]:
    cmd = [
        sys.executable,
        __file__,
        "--stage",
        stage,
        "--ads",
        str(args.ads),
        "--dim",
        str(args.dim),
        "--workdir",
        args.workdir,
        "--configs",
        name,
        "--latency-queries",
        str(args.latency_queries),
    ]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    print(out, end="", flush=True)
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def stage_curve(args: argparse.Namespace) -> dict[str, object]:
    prepare(Path(args.workdir), args.ads, args.dim, args.queries, args.seed)
    out_file = RESULTS / f"scale_curve_{args.machine}-{args.ads // 1_000_000}M.json"
    done = json.loads(out_file.read_text()) if out_file.exists() else {}
    results = done.get("indexes", {})
    command = "python benchmarks/scale.py " + " ".join(sys.argv[1:])
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"--configs: {name!r} is not one of {sorted(CONFIGS)}")
        print(f"== {name}: build", flush=True)
        built = _child("build-one", args, name)
        print(f"== {name}: serve", flush=True)
        served = _child("serve-one", args, name)
        results[name] = {"config": CONFIGS[name], "command": command, **built, **served}
        record = {
            "ads": args.ads,
            "dim": args.dim,
            "queries": args.queries,
            "latency_queries": args.latency_queries,
            "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), faiss "
            f"{__import__('faiss').__version__}",
            "indexes": results,
        }
        out_file.write_text(json.dumps(record, indent=2) + "\n")  # after each index
    return record


def one_config(configs: str) -> str:
    """The one index a stage serves (``--configs`` names it)."""
    names = configs.split(",")
    if len(names) != 1 or names[0] not in CONFIGS:
        raise SystemExit(f"--configs: name one index of {sorted(CONFIGS)}, got {configs!r}")
    return names[0]


def process_tree_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process and its descendants (tritonserver and its python-backend
    stubs), MB: now (VmRSS, summed), and each one's peak (VmHWM: the largest, and summed)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    now, peaks, named = 0.0, [], {}
    for member in tree:
        try:
            status = Path(f"/proc/{member}/status").read_text().splitlines()
            args = Path(f"/proc/{member}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        kb = {line.split(":")[0]: int(line.split()[1]) for line in status
              if line.startswith(("VmRSS:", "VmHWM:"))}  # fmt: skip
        now += kb.get("VmRSS", 0) / 1024
        peaks.append(kb.get("VmHWM", 0) / 1024)
        named[f"{member} {_process_name(args)}"] = round(peaks[-1], 1)
    return {"now_mb": now, "largest_peak_mb": max(peaks, default=0.0),
            "summed_peaks_mb": sum(peaks), "processes": len(tree),
            "peak_mb_by_process": named}  # fmt: skip


def _process_name(args: list[bytes]) -> str:
    """tritonserver, or the model a python-backend stub serves (its first argument is the
    model's ``model.py`` under ``<model>/<version>/``)."""
    words = [a.decode(errors="replace") for a in args if a]
    if len(words) > 1 and words[0].endswith("triton_python_backend_stub"):
        return Path(words[1]).parent.parent.name
    return Path(words[0]).name if words else "?"


def stage_updates(args: argparse.Namespace) -> dict[str, object]:
    """A tritonserver serving the whole corpus as one shard (``candgen_ad_shard``) under load,
    while ``--update-files`` files of ``--update-batch`` new ads and as many expiries arrive:
    failed requests, latency before/during/after, each file's time to visibility, and the
    server's memory."""
    import threading

    from candgen.endpoint.export import export_shards
    from candgen.endpoint.runtime import ServerConfig, start, status, stop
    from candgen.index.ann import IndexConfig
    from candgen.serving.shards import ShardedIndex
    from candgen.serving.steps import ServingConfig
    from candgen.serving.updates import write_update

    folder = prepare(Path(args.workdir), args.ads, args.dim, args.queries, args.seed)
    work = folder / "updates-run"
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    ids = AD_ID + 1 + np.arange(args.ads, dtype=np.int64)
    name = one_config(args.configs)
    index_cfg = IndexConfig(**CONFIGS[name], nprobe=args.nprobe, refine_factor=args.refine_factor)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    vectors = np.load(folder / "vectors.npy")
    export_shards(
        ids, vectors, 1, work / "repos", index_cfg,
        ServingConfig(max_inflight=0, ad_updates_dir=str(work / "updates"), ad_updates_poll_s=0.5),
        {"benchmark": "scale updates"}, progress=True,
    )  # fmt: skip
    del vectors
    build_s = time.perf_counter() - t0
    server = ServerConfig(
        model_repository=str(work / "repos" / "shard-0"), state_dir=str(work / "state"),
        http_port=8300, grpc_port=8301, metrics_port=8302, ready_timeout_s=600,
    )  # fmt: skip
    t0 = time.perf_counter()
    start(server)
    load_s = time.perf_counter() - t0
    pid = int(status(server)["pid"])
    memory = [process_tree_mb(pid)]
    qs = np.load(folder / "queries.npy")
    rng = np.random.default_rng(args.seed + 5)
    centers = rng.standard_normal((1000, args.dim)).astype(np.float32)  # not the corpus' own
    phase = ["before"]
    latencies: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    errors: list[str] = []
    stop_load = threading.Event()

    def load(worker: int) -> None:
        client = ShardedIndex([f"127.0.0.1:{server.grpc_port}"], timeout_s=10.0)
        i = worker
        while not stop_load.is_set():
            t = time.perf_counter()
            try:
                client.search(qs[i % len(qs)], K)
                latencies[phase[0]].append((time.perf_counter() - t) * 1e3)
            except Exception as e:  # every failure is counted and reported
                errors.append(repr(e))
            i += args.concurrency
        client.close()

    threads = [threading.Thread(target=load, args=(w,)) for w in range(args.concurrency)]
    try:
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        phase[0] = "during"
        probe = ShardedIndex([f"127.0.0.1:{server.grpc_port}"], timeout_s=10.0)
        visible, expired_seen, added_all, expired_all = [], 0, [], []
        live = np.ones(args.ads, bool)
        for seq in range(args.update_files):
            new_ids = AD_ID + 100_000_000 + seq * args.update_batch + np.arange(args.update_batch)
            new_vecs = centers[rng.integers(0, 1000, args.update_batch)]
            new_vecs += 0.5 * rng.standard_normal(new_vecs.shape).astype(np.float32)
            new_vecs /= np.linalg.norm(new_vecs, axis=1, keepdims=True)
            gone = rng.choice(np.flatnonzero(live), args.update_batch, replace=False)
            live[gone] = False
            written = time.perf_counter()
            write_update(work / "updates", seq, new_ids, new_vecs, ids[gone])
            # Visible: the file's last new ad is among its own vector's top 10 (files apply in
            # whole steps, in order), and its last expired ad is out of its own vector's.
            while True:
                found = probe.search(new_vecs[-1], 10)[0].tolist()
                if int(new_ids[-1]) in found:
                    break
                time.sleep(0.02)
            visible.append(time.perf_counter() - written)
            expired_seen += (
                int(ids[gone[-1]])
                in probe.search(np.load(folder / "vectors.npy", mmap_mode="r")[gone[-1]], 10)[
                    0
                ].tolist()
            )
            added_all.append((new_ids, new_vecs))
            expired_all.append(gone)
            memory.append(process_tree_mb(pid))
            print(f"update {seq}: visible after {visible[-1]:.2f} s", flush=True)
        phase[0] = "after"
        time.sleep(args.seconds)
        memory.append(process_tree_mb(pid))
        # every new ad findable by its own vector (a sample), no expired ad ever returned
        sample = rng.choice(args.update_files * args.update_batch, 500, replace=False)
        all_new = np.concatenate([a for a, _ in added_all])
        all_vecs = np.concatenate([v for _, v in added_all])
        found_new = np.mean([int(all_new[j]) in probe.search(all_vecs[j], 10)[0].tolist()
                             for j in sample])  # fmt: skip
        source = np.load(folder / "vectors.npy", mmap_mode="r")
        gone_all = np.concatenate(expired_all)
        gone_sample = rng.choice(gone_all, 500, replace=False)
        expired_found = sum(int(ids[j]) in probe.search(np.asarray(source[j]), 100)[0].tolist()
                            for j in gone_sample)  # fmt: skip
        probe.close()
    finally:
        stop_load.set()
        for t in threads:
            t.join()
        stop(server)

    def pct(values: list[float]) -> dict[str, float]:
        if not values:
            return {"requests": 0}
        p50, p99 = np.percentile(values, [50, 99])
        return {"requests": len(values), "p50_ms": round(float(p50), 2),
                "p99_ms": round(float(p99), 2), "max_ms": round(max(values), 1)}  # fmt: skip

    record = {
        "ads": args.ads,
        "index": name,
        "index_config": {
            **CONFIGS[name],
            "nprobe": args.nprobe,
            "refine_factor": args.refine_factor,
        },
        "build_s": round(build_s, 1),
        "server_load_s": round(load_s, 1),
        "concurrency": args.concurrency,
        "update_files": args.update_files,
        "update_batch": args.update_batch,
        "failed_requests": len(errors),
        "first_errors": errors[:5],
        "latency": {k: pct(v) for k, v in latencies.items()},
        "visible_s": {"p50": round(float(np.median(visible)), 2), "max": round(max(visible), 2)},
        "expired_still_found_at_visibility": expired_seen,
        "new_ads_found_in_own_top10": round(float(found_new), 3),
        "expired_ads_returned": int(expired_found),
        "server_memory_mb": {
            "after_load_now": round(memory[0]["now_mb"]),
            "max_now": round(max(m["now_mb"] for m in memory)),
            "largest_process_peak": round(max(m["largest_peak_mb"] for m in memory)),
            "processes": memory[0]["processes"],
        },
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), load generator on the "
        "same machine",
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(record, indent=2), flush=True)
    out = RESULTS / f"scale_updates_{args.machine}-{args.ads // 1_000_000}M.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def stage_shards(args: argparse.Namespace) -> dict[str, object]:
    """The corpus in 2 shards, each in its own tritonserver, searched through ``ShardedIndex``:
    exact shards against exact search over the whole corpus (ids and order), then the chosen
    compressed index in shards against the same truth; latency of a sharded search."""
    import shutil

    from candgen.endpoint.export import export_shards
    from candgen.endpoint.runtime import ServerConfig, start, stop
    from candgen.index.ann import IndexConfig
    from candgen.serving.shards import ShardedIndex
    from candgen.serving.steps import ServingConfig

    folder = prepare(Path(args.workdir), args.ads, args.dim, args.queries, args.seed)
    ids = AD_ID + 1 + np.arange(args.ads, dtype=np.int64)
    vectors = np.load(folder / "vectors.npy", mmap_mode="r")  # export_shards reads its rows
    qs, truth = np.load(folder / "queries.npy"), np.load(folder / "truth.npy")
    n_q = min(args.shard_queries, len(qs))
    name = one_config(args.configs)
    runs: dict[str, dict[str, object]] = {}
    for label, fields in (
        ("flat", {"kind": "flat"}),
        (name, {**CONFIGS[name], "nprobe": args.nprobe, "refine_factor": args.refine_factor}),
    ):
        work = folder / f"shards-{label}"
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        summary = export_shards(
            ids, vectors, 2, work / "repos", IndexConfig(**fields),  # type: ignore[arg-type]
            ServingConfig(max_inflight=0), {"benchmark": "scale shards"}, progress=True,
        )  # fmt: skip
        build_s = time.perf_counter() - t0
        servers = [
            ServerConfig(
                model_repository=repo,
                state_dir=str(work / f"state-{i}"),
                http_port=8310 + 10 * i,
                grpc_port=8311 + 10 * i,
                metrics_port=8312 + 10 * i,
                ready_timeout_s=600,
            )
            for i, repo in enumerate(summary["shards"])
        ]
        sharded: ShardedIndex | None = None
        try:
            for server in servers:
                start(server)
            sharded = ShardedIndex([f"127.0.0.1:{s.grpc_port}" for s in servers], timeout_s=30)
            for q in qs[:5]:
                sharded.search(q, K)  # warm
            found, times = [], []
            for q in qs[:n_q]:
                t = time.perf_counter()
                found.append(sharded.search(q, K)[0])
                times.append((time.perf_counter() - t) * 1e3)
        finally:
            if sharded is not None:
                sharded.close()
            for server in servers:
                stop(server)
        # Equal: the same ads, in the same order up to exact ties. Scores summed in another
        # order (a shard's FAISS, the truth's BLAS) differ in the last bits, so two ads whose
        # inner products agree within 1e-5 may come in either order.
        same = [
            len(f) == len(t)
            and set(f.tolist()) == set(t.tolist())
            and np.allclose(vectors[f - AD_ID - 1] @ q, vectors[t - AD_ID - 1] @ q, atol=1e-5)
            for f, t, q in zip(found, truth[:n_q], qs[:n_q], strict=True)
        ]
        in_order = sum(f.tolist() == t.tolist() for f, t in zip(found, truth[:n_q], strict=True))
        p50, p99 = np.percentile(times, [50, 99])
        runs[label] = {
            "index_config": fields,
            "build_s": round(build_s, 1),
            "queries": n_q,
            "equal_to_exact": int(sum(same)),
            "same_order_bit_for_bit": int(in_order),
            "recall@100": round(recall_at_k(found, list(truth[:n_q])), 4),
            "p50_ms": round(float(p50), 2),
            "p99_ms": round(float(p99), 2),
        }
        print(label, runs[label], flush=True)
    record = {
        "ads": args.ads,
        "shards": 2,
        "runs": runs,
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), both servers and the "
        "client on the same machine",
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
    }
    out = RESULTS / f"scale_shards_{args.machine}-{args.ads // 1_000_000}M.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def render_curve() -> str:
    """The recall/latency/memory curve of every stored run."""
    lines = ["## Scale: compressed ad indexes (`benchmarks/scale.py --stage curve`, issue 17)", ""]
    lines += [
        "Corpus: the serving benchmark's mixture of 1,000 Gaussian clusters, 64-d, L2-normalised; "
        "queries: fresh draws from the mixture (near no particular ad); truth: exact top 100. "
        "Each index built from a .npy file a chunk at a time in its own process, then loaded in a "
        "fresh one: *load RSS* is what loading it added, *bytes/ad* its saved size per ad. "
        "Latency: one query at a time on one thread (as the generators step runs FAISS); "
        "QPS: all queries in one batch on every core.",
        "",
    ]
    for path in sorted(RESULTS.glob("scale_curve_*.json")):
        run = json.loads(path.read_text())
        lines += [
            f"### {run['ads']:,} ads x {run['dim']} ({run['machine']})",
            "",
            f"{run['queries']} queries ({run['latency_queries']} timed one at a time); each "
            "index's command:",
            "",
            *sorted({f"- `{res['command']}`" for res in run["indexes"].values()}),
            "",
            "| index | build s | build peak RSS MB | bytes/ad | load RSS MB | setting | "
            "recall@100 | p50 ms | p99 ms | QPS batched |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for name, res in run["indexes"].items():
            for i, row in enumerate(res["rows"]):
                setting = ", ".join(f"{k} {v}" for k, v in row.items() if k in SEARCH_SETTINGS)
                head = (
                    f"| {name} | {res['build_s']} | {res['build_peak_rss_mb']} | "
                    f"{res['bytes_per_ad_saved']} | {res['load_rss_mb']} "
                    if i == 0
                    else "| | | | | "
                )
                lines.append(
                    f"{head}| {setting} | {row['recall@100']:.4f} | {row['p50_ms']} | "
                    f"{row['p99_ms']} | {row['qps_batched']:,.0f} |"
                )
        lines.append("")
    lines += render_runs()
    return "\n".join(lines)


def render_runs() -> list[str]:
    """The updates-while-serving and sharded runs, as stored."""
    lines = []
    for path in sorted(RESULTS.glob("scale_updates_*.json")):
        run = json.loads(path.read_text())
        lat, mem = run["latency"], run["server_memory_mb"]
        lines += [
            f"### Updates while serving {run['ads']:,} ads ({run['machine']})",
            "",
            f"`{run['command']}`: one tritonserver serving the whole corpus as one shard "
            f"(`candgen_ad_shard`, {run['index']}, nprobe {run['index_config'].get('nprobe')}, "
            f"refine factor {run['index_config'].get('refine_factor')}; built in "
            f"{run['build_s']} s, loaded in {run['server_load_s']} s), {run['concurrency']} "
            f"load threads asking K 100; {run['update_files']} files of "
            f"{run['update_batch']:,} new ads and {run['update_batch']:,} expiries, each "
            "written once the previous one was visible.",
            "",
            "| phase | requests | p50 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|",
            *[
                f"| {phase} | {v.get('requests', 0):,} | {v.get('p50_ms', '-')} | "
                f"{v.get('p99_ms', '-')} | {v.get('max_ms', '-')} |"
                for phase, v in lat.items()
            ],
            "",
            f"Failed requests: **{run['failed_requests']}**. Time to visibility (file written "
            f"to its last new ad answered): p50 {run['visible_s']['p50']} s, max "
            f"{run['visible_s']['max']} s. New ads found among their own vector's top 10 (500 "
            f"sampled): {run['new_ads_found_in_own_top10']:.1%}; expired ads returned (500 "
            f"sampled, each for its own vector, K 100): {run['expired_ads_returned']}. Server "
            f"memory ({mem['processes']} processes: tritonserver and its python-backend stub): "
            f"{mem['after_load_now']:,} MB after loading, at most {mem['max_now']:,} MB while "
            f"updating; largest process peak {mem['largest_process_peak']:,} MB.",
            "",
        ]
    for path in sorted(RESULTS.glob("scale_shards_*.json")):
        run = json.loads(path.read_text())
        lines += [
            f"### {run['ads']:,} ads in {run['shards']} shards, two tritonserver processes "
            f"({run['machine']})",
            "",
            f"`{run['command']}`: each shard's top 100 asked at once and merged "
            "(`ShardedIndex`), against exact search over the whole corpus.",
            "",
            "| shards' index | build s | queries | answers equal to exact | recall@100 | "
            "p50 ms | p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *[
                f"| {label} | {r['build_s']} | {r['queries']} | {r['equal_to_exact']} | "
                f"{r['recall@100']:.4f} | {r['p50_ms']} | {r['p99_ms']} |"
                for label, r in run["runs"].items()
            ],
            "",
        ]
    return lines


def largest(pattern: str) -> list[dict]:  # type: ignore[type-arg]
    """The stored run of the most ads among those matching ``pattern`` (none: empty)."""
    runs = [json.loads(p.read_text()) for p in RESULTS.glob(pattern)]
    return sorted(runs, key=lambda r: r["ads"])[-1:]


def headline() -> dict[str, dict[str, object]]:
    """The issue's figures that the stored runs measure; the live ensemble's from a 10M-ad run
    of benchmarks/serving.py (not met, value null, until there is one)."""
    figures: dict[str, dict[str, object]] = {}
    curve = RESULTS / "scale_curve_cpu-10M.json"
    if curve.exists():
        run = json.loads(curve.read_text())
        res = run["indexes"].get(SERVED_10M)
        row = next((r for r in res["rows"] if r.get("nprobe") == 8 and
                    r.get("refine_factor") == 4), None) if res else None  # fmt: skip
        if row is not None:
            figures["scale.recall100"] = {
                "value": row["recall@100"],
                "target": ">= 0.95",
                "met": row["recall@100"] >= 0.95,
                "how": f"recall@100 vs exact of the 10M-ad index alone ({SERVED_10M}, nprobe 8, "
                f"refine factor 4), {run['queries']:,} benchmark queries; not yet measured "
                f"through the live ensemble; `{res['command']}`",
            }
    for run in largest("scale_updates_cpu-*.json"):
        figures["scale.update_failed_requests"] = {
            "value": run["failed_requests"],
            "target": 0,
            "met": run["failed_requests"] == 0,
            "how": f"failed requests while {run['update_files'] * run['update_batch']:,} ads "
            f"were added and as many expired, {run['ads']:,} ads served by one tritonserver "
            "(the candgen_ad_shard model), not yet the whole ensemble; visible after p50 "
            f"{run['visible_s']['p50']} s, max {run['visible_s']['max']} s; `{run['command']}`",
        }
    live = [r for r in largest("serving_ensemble_*.json") if r["ads"] >= 10_000_000]
    for run in live:
        figures.update(ensemble_figures(run))
    for key, target in (("scale.ads", ">= 10,000,000"), ("scale.rss_gb", "<= 4"),
                        ("scale.p99_ms_c1", "<= 20")):  # fmt: skip
        figures.setdefault(key, {
            "value": None,
            "target": target,
            "met": False,
            "how": "not measured: no live-ensemble run of 10M ads is stored "
            "(`benchmarks/serving.py --stage ensemble --ads 10000000 ...`)",
        })  # fmt: skip
    for run in largest("scale_shards_cpu-*.json"):
        flat = run["runs"]["flat"]
        equal = flat["equal_to_exact"] == flat["queries"]
        figures["scale.sharded_equals_exact"] = {
            "value": equal,
            "target": True,
            "met": equal,
            "how": f"{flat['equal_to_exact']} of {flat['queries']} merged answers (K 100) equal "
            f"to exact search over all {run['ads']:,} ads (the same ads, in the same order up to "
            f"inner products within 1e-5: {flat.get('same_order_bit_for_bit', '?')} in exactly "
            "the same order), 2 exact shards in 2 tritonserver processes; "
            f"`{run['command']}`",
        }
    return figures


def ensemble_figures(run: dict) -> dict[str, dict[str, object]]:  # type: ignore[type-arg]
    """The live ensemble's figures, from ``benchmarks/serving.py --stage ensemble`` at 10M ads:
    ads served, the peak RSS of the process holding them, p99 at concurrency 1 and the served
    index's recall against exact search on the ensemble's own user vectors."""
    memory = run["server_memory"]["after_load"]
    by_process = memory["peak_mb_by_process"]
    holder = max((k for k in by_process if k.endswith("candgen_generators")),
                 key=by_process.__getitem__)  # fmt: skip
    gb = by_process[holder] / 1024
    ranked = sorted(by_process.items(), key=lambda kv: -kv[1])
    peaks = ", ".join(f"{k.split()[1]} {v / 1024:.2f}" for k, v in ranked)
    c1 = {r["traffic"]: r for r in run["levels"] if r["concurrency"] == 1}
    busiest = max(run["levels"], key=lambda r: r["qps"])
    served = next(r for r in run["stages"] if r["stage"].endswith("(served)"))
    command = f"`{run['command']}`"
    where = (
        f"{run['ads']:,} ads x {run['dim']} ({run['ad_index']}; ad text {run['content_index']}), "
        f"live ensemble, one tritonserver on this machine"
    )
    figures: dict[str, dict[str, object]] = {
        "scale.ads": {
            "value": run["ads"],
            "target": ">= 10,000,000",
            "met": run["ads"] >= 10_000_000 and sum(r["errors"] for r in run["levels"]) == 0,
            "how": f"{where}: {sum(r['requests'] for r in run['levels']):,} requests answered, "
            f"{sum(r['errors'] for r in run['levels'])} failed; built in {run['build_s']:.0f} s "
            f"(ads index {run['seq_index_build_s']:.0f} s, text index "
            f"{run['content_index_build_s']:.0f} s), server ready in "
            f"{run['server_load_s']:.0f} s; most throughput {busiest['qps']:.1f} QPS "
            f"({busiest['traffic']} at concurrency {busiest['concurrency']}, p99 "
            f"{busiest['p99_ms']:.1f} ms); {command}",
        },
        "scale.rss_gb": {
            "value": round(gb, 2),
            "target": "<= 4",
            "met": gb <= 4,
            "how": f"GiB: peak RSS (VmHWM) of the process that holds the {run['ads']:,} ads, "
            "the generators step's python-backend stub, over the whole run "
            f"({gb * 1.073741824:.2f} GB in powers of ten); all {memory['processes']} "
            "processes of the server "
            f"(tritonserver and every step's stub) peaked at "
            f"{memory['summed_peaks_mb'] / 1024:.2f} GiB together (sum of each one's peak: "
            f"{peaks} GiB); {where}; {command}",
        },
        "scale.recall100": {
            "value": round(served["recall@100"], 4),
            "target": ">= 0.95",
            "met": served["recall@100"] >= 0.95,
            "how": f"{served['stage']}: recall@100 of the served index against exact search, on "
            f"{run['queries']:,} of the ensemble's own user vectors; {where}; {command}",
        },
    }
    plain = c1.get("no context")
    if plain is not None:  # a run without concurrency 1 has no such figure
        figures["scale.p99_ms_c1"] = {
            "value": round(plain["p99_ms"], 2),
            "target": "<= 20",
            "met": plain["p99_ms"] <= 20,
            "how": "p99 at concurrency 1 of requests without context through the live "
            f"ensemble (gRPC, K 100; p50 {plain['p50_ms']:.2f} ms, {plain['requests']:,} "
            "requests interleaved with the other kinds: "
            + ", ".join(f"{k} p99 {r['p99_ms']:.2f} ms" for k, r in c1.items() if r is not plain)
            + "; this VM's p99 drifts by a millisecond or two from run to run: every run is in "
            f"docs/benchmarks/serving_notes.md, section 17); {where}; {command}",
        }
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--stage",
        choices=["curve", "updates", "shards", "build-one", "serve-one"],
        default="curve",
    )
    p.add_argument("--ads", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1_000)
    p.add_argument("--latency-queries", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    p.add_argument("--machine", default="cpu")
    p.add_argument("--workdir", default="data/bench_scale")
    p.add_argument("--render-only", action="store_true", help="rewrite the doc from stored runs")
    p.add_argument("--nprobe", type=int, default=16, help="updates: the served index's nprobe")
    p.add_argument("--refine-factor", type=int, default=4, help="updates: its refine factor")
    p.add_argument("--concurrency", type=int, default=2, help="updates: load threads")
    p.add_argument("--seconds", type=float, default=20.0, help="updates: load before and after")
    p.add_argument("--update-files", type=int, default=10)
    p.add_argument("--shard-queries", type=int, default=200, help="shards: queries compared")
    p.add_argument("--update-batch", type=int, default=10_000, help="new ads (and expiries) a file")
    return p


def main() -> int:
    args = parser().parse_args()
    folder = Path(args.workdir) / f"{args.ads}x{args.dim}"
    if args.stage == "build-one":
        print(json.dumps(build_one(folder, args.configs)))
        return 0
    if args.stage == "serve-one":
        print(json.dumps(serve_one(folder, args.configs, args.latency_queries)))
        return 0
    if args.stage == "updates" and not args.render_only:
        stage_updates(args)
    elif args.stage == "shards" and not args.render_only:
        stage_shards(args)
    elif not args.render_only:
        stage_curve(args)
    write_section("scale-curve", render_curve())
    write_headline(headline())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
