"""Starting and stopping the real tritonserver locally (the one shipped in nvidia-pytriton).

The server runs from the serving environment (``.venv-serving``, numpy<2; see
../shared/DESIGN.md): its ``bin`` goes first on PATH because the python backend stub takes the
first Python there, ``LD_LIBRARY_PATH`` points at the wheel's bundled libraries, and a backend
folder is assembled from the wheel's ``libtriton_python.so``, ``triton_python_backend_utils.py``
and the Python 3.11 stub. The server's pid, log and ports are kept in a state folder so that
``candgen serve --stop`` finds it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from candgen.errors import CandgenError, ConfigError
from candgen.paths import REPO_ROOT

STATE_FILE = "server.json"
TRACE_PART = 1_000  # traces per part file of a trace (ServerConfig.trace_file)


@dataclass(frozen=True)
class ServerConfig:
    """How to run tritonserver locally.

    Attributes:
        model_repository: the Triton model repository folder.
        http_port: HTTP/REST port.
        grpc_port: gRPC port.
        metrics_port: Prometheus metrics port.
        state_dir: where the pid, log and backend folder live.
        serving_env: the serving virtual environment.
        explicit_models: load only these models (explicit model control; empty: load all,
            still with explicit control so that models can be swapped without a restart).
        repository_poll_s: 0 for explicit model control (``candgen serving swap`` loads a new
            version); > 0 polls the repository every this many seconds and loads what was
            installed there by itself, as the Triton replicas of k8s/ do.
        ready_timeout_s: how long to wait for readiness.
        shm_mb: shared memory per python-backend model (Docker's /dev/shm is 64 MB).
        trace_file: where Triton writes a timestamp trace of sampled requests (JSON, one
            record per request and per ensemble step, in parts ``<trace_file>.0``, ``.1``, ...
            of ``TRACE_PART`` traces as they fill and the rest when the server stops, so that a
            stop cut short by its exit timeout loses at most the last part; ``read_trace``
            reads them together); empty: no tracing.
        trace_rate: with ``trace_file``, trace one request in this many (1: every request).
        exit_timeout_s: once asked to stop, how long Triton waits for in-flight requests and
            open client connections (an idle keep-alive connection counts) before it exits.
    """

    model_repository: str = "data/model_repository"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    state_dir: str = "data/triton"
    serving_env: str = str(REPO_ROOT / ".venv-serving")
    explicit_models: tuple[str, ...] = ()
    repository_poll_s: int = 0
    ready_timeout_s: float = 60.0
    shm_mb: int = 16
    trace_file: str = ""
    trace_rate: int = 1000
    exit_timeout_s: int = 5

    def __post_init__(self) -> None:
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        for name, port in zip(("http_port", "grpc_port", "metrics_port"), ports, strict=True):
            if not 0 < port < 65536:
                raise ConfigError(name, f"must be a TCP port (1..65535), got {port}")
        if len(set(ports)) != 3:
            raise ConfigError("grpc_port", f"the three ports must differ, got {ports}")
        if self.ready_timeout_s <= 0:
            raise ConfigError("ready_timeout_s", "must be > 0")
        if self.repository_poll_s < 0:
            raise ConfigError("repository_poll_s", f"must be >= 0, got {self.repository_poll_s}")
        if self.trace_rate < 1:
            raise ConfigError("trace_rate", f"must be >= 1, got {self.trace_rate}")
        if self.exit_timeout_s < 0:
            raise ConfigError("exit_timeout_s", f"must be >= 0, got {self.exit_timeout_s}")
        if self.repository_poll_s and self.explicit_models:
            raise ConfigError(
                "explicit_models",
                "a polling server loads every model it finds; "
                "leave explicit_models empty or repository_poll_s at 0",
            )


def _tritonserver_root(serving_env: Path) -> Path:
    found = sorted(serving_env.glob("lib/python3*/site-packages/pytriton/tritonserver"))
    if not found:
        raise CandgenError(f"serving_env: no tritonserver under {serving_env}; run `make setup`")
    return found[0]


def _backend_dir(root: Path, state: Path) -> Path:
    backends = state / "backends"
    python = backends / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in (
        root / "backends/python/libtriton_python.so",
        root / "backends/python/triton_python_backend_utils.py",
        root / "python_backend_stubs/3.11/triton_python_backend_stub",
    ):
        dst = python / src.name
        if not dst.exists():
            shutil.copy2(src, dst)
    return backends


def endpoints(config: ServerConfig) -> dict[str, str]:
    return {
        "http": f"127.0.0.1:{config.http_port}",
        "grpc": f"127.0.0.1:{config.grpc_port}",
        "metrics": f"http://127.0.0.1:{config.metrics_port}/metrics",
    }


def _ready(config: ServerConfig) -> bool:
    url = f"http://127.0.0.1:{config.http_port}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def start(config: ServerConfig) -> dict[str, object]:
    """Starts tritonserver in the background and waits until it reports ready.

    Raises:
        CandgenError: a server from this state folder still runs, the repository is missing,
            or the server exits or stays unready (the log's tail is in the message).
    """
    state = Path(config.state_dir).resolve()
    repo = Path(config.model_repository).resolve()
    if not repo.is_dir():
        raise CandgenError(f"model_repository: {repo} is not a folder")
    running = status(config)
    if running["running"]:
        raise CandgenError(
            f"a server from {state} is running (pid {running['pid']}); `candgen serve --stop` first"
        )
    env_dir = Path(config.serving_env)
    root = _tritonserver_root(env_dir)
    backends = _backend_dir(root, state)
    env = dict(os.environ)
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(root.parent.parent / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH", "")]
    )
    env["VIRTUAL_ENV"] = str(env_dir)
    cmd = [
        str(root / "bin" / "tritonserver"),
        f"--model-repository={repo}",
        f"--backend-directory={backends}",
        f"--http-port={config.http_port}",
        f"--grpc-port={config.grpc_port}",
        f"--metrics-port={config.metrics_port}",
        f"--backend-config=python,shm-default-byte-size={config.shm_mb * 2**20}",
        f"--exit-timeout-secs={config.exit_timeout_s}",
        "--log-verbose=0",
    ]
    if config.trace_file:
        trace = Path(config.trace_file).resolve()
        if not trace.parent.is_dir():
            raise CandgenError(f"trace_file: folder {trace.parent} does not exist")
        cmd += [
            f"--trace-config=triton,file={trace}",
            "--trace-config=level=TIMESTAMPS",
            f"--trace-config=rate={config.trace_rate}",
            f"--trace-config=triton,log-frequency={TRACE_PART}",
        ]
    models = config.explicit_models or tuple(
        sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").exists())
    )
    if config.repository_poll_s:
        cmd += ["--model-control-mode=poll", f"--repository-poll-secs={config.repository_poll_s}"]
    else:
        cmd += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)]
    log = state / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    info = {
        "pid": proc.pid,
        "log": str(log),
        "config": asdict(config),
        **endpoints(config),
        "models": list(models),
    }
    (state / STATE_FILE).write_text(json.dumps(info, indent=2))
    deadline = time.monotonic() + config.ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CandgenError(
                f"tritonserver exited with {proc.returncode}; log tail:\n" + _tail(log)
            )
        if _ready(config):
            return info
        time.sleep(0.25)
    stop(config)
    raise CandgenError(
        f"tritonserver not ready after {config.ready_timeout_s:.0f}s; log tail:\n" + _tail(log)
    )


def _tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by us) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def status(config: ServerConfig) -> dict[str, Any]:
    path = Path(config.state_dir).resolve() / STATE_FILE
    if not path.exists():
        return {"running": False, "pid": None}
    info = json.loads(path.read_text())
    return {"running": _alive(int(info["pid"])), **info}


def stop(config: ServerConfig, timeout_s: float | None = None) -> bool:
    """Stops the server started from ``config.state_dir``; True if one was running. Past
    ``timeout_s`` (default: 15 s beyond the server's own exit timeout) it is killed."""
    if timeout_s is None:
        timeout_s = config.exit_timeout_s + 15.0
    info = status(config)
    pid = info.get("pid")
    if not info["running"] or pid is None:
        (Path(config.state_dir).resolve() / STATE_FILE).unlink(missing_ok=True)
        return False
    os.killpg(int(pid), signal.SIGTERM)  # graceful: Triton finishes in-flight requests
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(int(pid)):
        time.sleep(0.2)
    if _alive(int(pid)):
        os.killpg(int(pid), signal.SIGKILL)
    (Path(config.state_dir).resolve() / STATE_FILE).unlink(missing_ok=True)
    return True
