"""Launching `candgen train` as a distributed TorchX job.

Locally: ``torchx run -s local_cwd dist.torchrun -j 1x2 -m candgen.cli -- train ...`` (two CPU
processes, DDP over gloo). On Kubernetes the same component runs with ``-s kubernetes``, the
platform image, GPUs per replica and nccl (the trainer picks nccl when it sees a GPU):

    torchx run -s kubernetes -cfg queue=default,namespace=candgen dist.torchrun \\
        --image <registry>/candgen-platform:<tag> -j 2x1 --gpu 1 -m candgen.cli -- train ...
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from candgen.errors import CandgenError, ConfigError
from candgen.training.config import TrainConfig
from candgen.training.trainer import METRICS_FILE

SCHEDULERS = ("local_cwd", "kubernetes")


def config_flags(config: TrainConfig) -> list[str]:
    """The `candgen train` flags that reproduce ``config`` (fields left at defaults are omitted)."""
    default = TrainConfig()
    flags: list[str] = []
    for key, value in config.to_dict().items():
        if value == getattr(default, key):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def torchx_command(
    config: TrainConfig,
    nproc: int = 2,
    nnodes: int = 1,
    scheduler: str = "local_cwd",
    image: str = "",
    gpus: int = 0,
    scheduler_args: str = "",
    dryrun: bool = False,
) -> list[str]:
    """The `torchx run` command line for a distributed training job."""
    if scheduler not in SCHEDULERS:
        raise ConfigError("scheduler", f"{scheduler!r} is not one of {SCHEDULERS}")
    if nproc < 1 or nnodes < 1:
        raise ConfigError("nproc", f"need >= 1 process per node and node, got {nnodes}x{nproc}")
    if scheduler == "kubernetes" and not image:
        raise ConfigError("image", "the kubernetes scheduler needs the platform image")
    torchx = shutil.which("torchx", path=str(Path(sys.executable).parent)) or "torchx"
    cmd = [torchx, "run", "-s", scheduler]
    if scheduler == "kubernetes":
        cmd += ["--workspace", ""]  # run the released image as is; never build from the cwd
    if scheduler_args:
        cmd += ["-cfg", scheduler_args]
    cmd += ["--dryrun"] if dryrun else ["--wait", "--log"]
    cmd += ["dist.torchrun", "-j", f"{nnodes}x{nproc}", "--name", f"candgen-train-{config.model}"]
    if image:
        cmd += ["--image", image]
    if gpus:
        cmd += ["--gpu", str(gpus)]
    return [*cmd, "-m", "candgen.cli", "--", "train", *config_flags(config)]


def kubernetes_job(
    config: TrainConfig,
    image: str,
    nnodes: int = 2,
    nproc: int = 1,
    gpus: int = 1,
    queue: str = "default",
    memory_mb: int = 16_384,
    cpus: int = 4,
) -> dict[str, Any]:
    """The Volcano Job that ``torchx run -s kubernetes dist.torchrun ...`` would submit.

    It is built offline (no cluster needed), so it can be reviewed, checked in, or applied
    with ``kubectl apply -f``. Workers see a GPU, so the trainer uses nccl.
    """
    from torchx.components import dist as dist_components
    from torchx.schedulers.kubernetes_scheduler import app_to_resource

    if not image:
        raise ConfigError("image", "the kubernetes job needs the platform image")
    app = dist_components.torchrun(
        "train", *config_flags(config), m="candgen.cli", image=image,
        name=f"candgen-train-{config.model}", j=f"{nnodes}x{nproc}", gpu=gpus, cpu=cpus,
        memMB=memory_mb,
    )  # fmt: skip
    return app_to_resource(app, queue=queue, service_account=None)


def launch(config: TrainConfig, nproc: int = 2) -> dict[str, Any]:
    """Runs a local TorchX job of ``nproc`` processes and returns rank 0's metrics.json."""
    cmd = torchx_command(config, nproc=nproc)
    env = dict(os.environ)
    # local_cwd starts torchrun from PATH: make it the one beside this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    metrics = Path(config.out_dir) / METRICS_FILE
    metrics.unlink(missing_ok=True)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not metrics.exists():
        raise CandgenError(
            f"the TorchX job failed (exit {proc.returncode}); its log is above. Command: "
            + " ".join(cmd)
        )
    return json.loads(metrics.read_text())
