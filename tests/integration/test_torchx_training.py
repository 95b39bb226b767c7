"""A real TorchX job: `torchx run -s local_cwd dist.torchrun -j 1x2` with DDP over gloo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from candgen.errors import ConfigError
from candgen.models.factory import load_model
from candgen.training.config import TrainConfig
from candgen.training.launch import kubernetes_job, launch, torchx_command
from candgen.training.trainer import CHECKPOINT, train

pytestmark = pytest.mark.integration

# One and two processes take the same steps of the same global batch, but draw different
# negatives and dropout masks per process, so their metrics agree only within a tolerance.
TOLERANCE_HR10 = 0.08


def _config(out: Path) -> TrainConfig:
    return TrainConfig(dataset="planted", model="hstu", seed=42, epochs=12, batch_size=64,
                       max_len=20, eval_every=4, progress=False, track=False,
                       out_dir=str(out))  # fmt: skip


def test_two_process_torchx_run_matches_one_process(tmp_path: Path) -> None:
    two = launch(_config(tmp_path / "two"), nproc=2)
    assert two["world_size"] == 2
    one = train(_config(tmp_path / "one"))
    assert one.world_size == 1
    assert abs(two["test"]["hr@10"] - one.test_metrics["hr@10"]) <= TOLERANCE_HR10, (
        two["test"]["hr@10"],
        one.test_metrics["hr@10"],
    )
    model, saved = load_model(tmp_path / "two" / "model.pt")
    assert saved["config"]["model"] == "hstu" and model.num_items == 300
    ckpt = __import__("torch").load(tmp_path / "two" / CHECKPOINT, weights_only=False)
    assert ckpt["epoch"] == 12
    model.load_state_dict(ckpt["model"])  # the training checkpoint loads into the model too


def test_cli_launch_failure_is_reported(tmp_path: Path) -> None:
    # A data folder that does not exist: the job fails in the workers and the CLI says so.
    proc = subprocess.run(
        [sys.executable, "-m", "candgen.cli", "train", "--nproc", "2", "--dataset", "marketplace",
         "--data-dir", str(tmp_path / "missing"), "--no-track", "--no-progress",
         "--out-dir", str(tmp_path / "out")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "the TorchX job failed" in proc.stderr


def test_kubernetes_job_is_a_gpu_volcano_job(tmp_path: Path) -> None:
    job = kubernetes_job(_config(tmp_path), image="registry.example/candgen-platform:1",
                         nnodes=2, gpus=1)  # fmt: skip
    assert job["kind"] == "Job" and job["apiVersion"].startswith("batch.volcano.sh")
    tasks = job["spec"]["tasks"]
    assert sum(t["replicas"] for t in tasks) == 2  # one pod per node
    task = tasks[0]
    container = task["template"].spec.containers[0]
    assert container.image == "registry.example/candgen-platform:1"
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    command = " ".join(container.command)
    assert "candgen.cli train" in command and "--dataset planted" in command


def test_kubernetes_needs_an_image(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="image: "):
        torchx_command(_config(tmp_path), scheduler="kubernetes")


def test_cli_prints_an_applicable_kubernetes_job() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "candgen.cli", "train", "--k8s-image", "reg/candgen:1",
         "--dataset", "games", "--model", "hstu", "--nproc", "1", "--nnodes", "2"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    import yaml

    job = yaml.safe_load(proc.stdout)
    assert job["kind"] == "Job"
    container = job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]
    assert container["image"] == "reg/candgen:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--model hstu" in " ".join(container["command"])
