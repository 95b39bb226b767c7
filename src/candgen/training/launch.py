"""Launching `candgen train` as a distributed TorchX job.

Locally: ``torchx run -s local_cwd dist.torchrun -j 1x2 -m candgen.cli -- train ...`` (two CPU
processes, DDP over gloo). On Kubernetes the same command runs with ``-s kubernetes``: a Volcano
job of ``replicas`` pods of the platform image, GPUs per pod and nccl (the trainer picks nccl
when it sees a GPU). The launching process and the pods share a ReadWriteMany volume: the inputs
are staged on it, the pods write there, and the outputs are copied back, so the caller sees the
same ``out_dir`` on either scheduler.

    candgen train --scheduler kubernetes --replicas 2 --nproc 1 --gpus 1 --dryrun ...

prints the job that TorchX would submit (its own dry run; no cluster is needed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from candgen.errors import CandgenError, ConfigError
from candgen.training.config import JobConfig, TrainConfig
from candgen.training.trainer import METRICS_FILE

COMPONENT = "dist.torchrun"


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
        elif isinstance(value, tuple):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def component_args(config: TrainConfig, job: JobConfig) -> list[str]:
    """The ``dist.torchrun`` arguments of the job (the same for ``torchx run`` and the dry run)."""
    args = ["-j", f"{job.replicas}x{job.nproc}", "--name", f"candgen-train-{config.model}"]
    if job.scheduler == "kubernetes":
        args += [
            "--image",
            job.image,
            "--cpu",
            str(job.cpus),
            "--memMB",
            str(job.memory_mb),
            "--gpu",
            str(job.gpus),
            "--mounts",
            f"type=volume,src={job.work_volume},dst={job.work_dir}",
        ]
    return [*args, "-m", "candgen.cli", "--", "train", *config_flags(config)]


def scheduler_args(job: JobConfig, validate: bool = True) -> dict[str, str | bool]:
    """The scheduler's run options (``-cfg``); ``validate`` asks the cluster to check the spec."""
    if job.scheduler != "kubernetes":
        return {}
    cfg: dict[str, str | bool] = {"queue": job.queue, "namespace": job.namespace}
    if job.service_account:
        cfg["service_account"] = job.service_account
    if not validate:
        cfg["validate_spec"] = False
    return cfg


def torchx_command(config: TrainConfig, job: JobConfig) -> list[str]:
    """The `torchx run` command line that runs the job and waits for it."""
    torchx = shutil.which("torchx", path=str(Path(sys.executable).parent)) or "torchx"
    cmd = [torchx, "run", "-s", job.scheduler]
    if job.scheduler == "kubernetes":
        cmd += ["--workspace", ""]  # run the released image as is; never build from the cwd
        cfg = scheduler_args(job)
        cmd += ["-cfg", ",".join(f"{k}={v}" for k, v in cfg.items())]
    return [*cmd, "--wait", "--log", COMPONENT, *component_args(config, job)]


def kubernetes_job(config: TrainConfig, job: JobConfig) -> dict[str, Any]:
    """The Volcano Job that ``torchx run -s kubernetes`` would submit, from TorchX's own dry run.

    No cluster is asked (the spec is not validated against one), so it can be reviewed,
    tested or applied with ``kubectl apply -f``.

    Returns:
        The job as plain JSON-able data.
    """
    from kubernetes.client import ApiClient
    from torchx.runner import get_runner

    if job.scheduler != "kubernetes":
        raise ConfigError("scheduler", f"a dry run renders the kubernetes job, not {job.scheduler}")
    with get_runner() as runner:
        info = runner.dryrun_component(
            COMPONENT,
            component_args(config, job),
            "kubernetes",
            cfg=scheduler_args(job, validate=False),
        )
    rendered: dict[str, Any] = ApiClient().sanitize_for_serialization(info.request.resource)
    return rendered


def stage_on_volume(config: TrainConfig, job: JobConfig, name: str = "") -> TrainConfig:
    """Copies the job's inputs onto the shared volume and points the config at them.

    Returns:
        ``config`` with data_dir, features_dir, semantic_ids and out_dir under
        ``<work_dir>/jobs/<name>``.
    """
    root = Path(job.work_dir)
    if not root.is_dir():
        raise ConfigError(
            "work_dir",
            f"{root} is not mounted here; mount the {job.work_volume} "
            "volume in the launching pod too",
        )
    staged = root / "jobs" / (name or f"train-{uuid.uuid4().hex[:12]}")
    changes: dict[str, Any] = {"out_dir": str(staged / "out")}
    for field in ("data_dir", "features_dir", "semantic_ids"):
        source = Path(getattr(config, field))
        if not getattr(config, field):
            continue
        if source.is_file():  # a sequence file, or the generative model's ID table
            (staged / field).mkdir(parents=True, exist_ok=True)
            changes[field] = str(shutil.copy2(source, staged / field / source.name))
        else:
            shutil.copytree(source, staged / field, dirs_exist_ok=True)
            changes[field] = str(staged / field)
    return replace(config, **changes)


def launch(config: TrainConfig, job: JobConfig | None = None) -> dict[str, Any]:
    """Runs the TorchX job, waits for it and returns rank 0's metrics.json.

    On kubernetes the inputs go through the shared volume and ``config.out_dir`` receives the
    job's outputs afterwards, as it does locally.
    """
    job = job or JobConfig()
    run_config = stage_on_volume(config, job) if job.scheduler == "kubernetes" else config
    cmd = torchx_command(run_config, job)
    env = dict(os.environ)
    # local_cwd starts torchrun from PATH: make it the one beside this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    metrics = Path(run_config.out_dir) / METRICS_FILE
    metrics.unlink(missing_ok=True)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not metrics.exists():
        raise CandgenError(
            f"the TorchX job failed (exit {proc.returncode}); its log is above. Command: "
            + " ".join(cmd)
        )
    if run_config is not config:
        shutil.copytree(run_config.out_dir, config.out_dir, dirs_exist_ok=True)
        metrics = Path(config.out_dir) / METRICS_FILE
    results: dict[str, Any] = json.loads(metrics.read_text())
    return results
