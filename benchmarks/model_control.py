"""Does asking a live tritonserver for a model load stall the requests it is serving?

Starts the tritonserver of .venv-serving on a throwaway repository of two python-backend models,
``echo`` (answers at once) and ``slow_load`` (its initialize sleeps ``--load-s`` seconds), keeps
HTTP and gRPC clients asking ``echo`` without pause, and reloads ``slow_load`` (its file
rewritten, so that Triton does load it again) once over HTTP and once over gRPC. Prints, and
writes to docs/BENCHMARKS.md (section ``model_control``), the worst latency each client saw
during each load. ``candgen serving swap`` asks over gRPC because of what this measures.

    .venv/bin/python benchmarks/model_control.py
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_doc import write_section

from candgen.endpoint.runtime import ServerConfig, start, stop

MODEL_PY = """
import time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        time.sleep({load_s})  # written at {written}

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())]
            )
            for r in requests
        ]
"""
CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
input [{{ name: "X" data_type: TYPE_INT32 dims: [1] }}]
output [{{ name: "Y" data_type: TYPE_INT32 dims: [1] }}]
instance_group [{{ kind: KIND_CPU count: 1 }}]
"""


def write_model(root: Path, name: str, load_s: float) -> None:
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    (root / name / "config.pbtxt").write_text(CONFIG.format(name=name))
    (root / name / "1" / "model.py").write_text(MODEL_PY.format(load_s=load_s, written=time.time()))


def ask_until(stop_flag: threading.Event, protocol: str, url: str, worst: list[float]) -> None:
    """Asks ``echo`` until ``stop_flag``; appends the slowest answer's seconds to ``worst``."""
    if protocol == "http":
        import tritonclient.http as client_module

        client = client_module.InferenceServerClient(url, network_timeout=120)
    else:
        import tritonclient.grpc as client_module

        client = client_module.InferenceServerClient(url)
    x = client_module.InferInput("X", [1], "INT32")
    x.set_data_from_numpy(np.array([1], np.int32))
    slowest = 0.0
    while not stop_flag.is_set():
        t0 = time.perf_counter()
        client.infer("echo", [x])
        slowest = max(slowest, time.perf_counter() - t0)
    worst.append(slowest)


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repository"
        write_model(root, "echo", 0)
        write_model(root, "slow_load", args.load_s)
        http, grpc, metrics = args.http_port, args.http_port + 1, args.http_port + 2
        urls = {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}"}
        config = ServerConfig(model_repository=str(root), http_port=http, grpc_port=grpc,
                              metrics_port=metrics, state_dir=str(Path(tmp) / "state"),
                              ready_timeout_s=180)  # fmt: skip
        start(config)
        try:
            for load_over in ("http", "grpc"):
                stop_flag = threading.Event()
                worst: dict[str, list[float]] = {"http": [], "grpc": []}
                threads = [
                    threading.Thread(target=ask_until, args=(stop_flag, p, urls[p], worst[p]))
                    for p in ("http", "grpc")
                    for _ in range(args.clients)
                ]
                for t in threads:
                    t.start()
                time.sleep(1.0)
                if load_over == "http":
                    import tritonclient.http as control_module

                    control = control_module.InferenceServerClient(
                        urls["http"], network_timeout=300
                    )
                else:
                    import tritonclient.grpc as control_module  # type: ignore[no-redef]

                    control = control_module.InferenceServerClient(urls["grpc"])
                write_model(root, "slow_load", args.load_s)  # a changed file: Triton loads again
                t0 = time.perf_counter()
                control.load_model("slow_load")
                load_s = time.perf_counter() - t0
                time.sleep(1.0)
                stop_flag.set()
                for t in threads:
                    t.join()
                for protocol, seconds in worst.items():
                    rows.append({
                        "load_over": load_over,
                        "load_s": round(load_s, 2),
                        "clients": protocol,
                        "worst_ms": sorted(round(s * 1000, 1) for s in seconds),
                        "stalled": sum(s > args.load_s / 2 for s in seconds),
                    })  # fmt: skip
                    print(rows[-1], flush=True)
        finally:
            stop(config)
    return rows


def render(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "## Model control under load (does a load stall the requests being served?)",
        "",
        f"`.venv/bin/python benchmarks/model_control.py --load-s {args.load_s} --clients "
        f"{args.clients}` on {platform.node()} ({os.cpu_count()} CPUs): {args.clients} HTTP and "
        f"{args.clients} gRPC clients ask a python-backend echo model without pause while a "
        f"model whose load takes {args.load_s} s is reloaded, once asked over HTTP and once "
        "over gRPC. `stalled`: clients whose slowest answer took more than half the load.",
        "",
        "| load asked over | load took (s) | clients | worst answer per client (ms) | stalled |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['load_over']} | {r['load_s']} | {r['clients']} | "
        f"{', '.join(str(w) for w in r['worst_ms'])} | {r['stalled']} of {len(r['worst_ms'])} |"
        for r in rows
    ]
    lines += [
        "",
        "Triton's HTTP server handles a load on the worker thread of the connection that asked "
        "for it, so the HTTP requests of the connections that thread serves wait for the whole "
        "load; a load asked over gRPC stalls nothing. `candgen serving swap` and the deploy step "
        "therefore ask over gRPC by default.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load-s", type=float, default=3.0, help="how long the reloaded model loads")
    p.add_argument("--clients", type=int, default=4, help="clients per protocol")
    p.add_argument("--http-port", type=int, default=18100, help="gRPC and metrics: the next two")
    args = p.parse_args(argv)
    if args.load_s <= 0 or args.clients < 1:
        p.error("--load-s must be > 0 and --clients >= 1")
    rows = measure(args)
    write_section("model_control", render(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
