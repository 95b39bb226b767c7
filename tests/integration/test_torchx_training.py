"""A real TorchX job: `torchx run -s local_cwd dist.torchrun -j 1x2` with DDP over gloo."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from candgen.errors import ConfigError
from candgen.models.factory import load_model
from candgen.training.config import JobConfig, TrainConfig
from candgen.training.launch import kubernetes_job, launch, stage_on_volume, torchx_command
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
    two = launch(_config(tmp_path / "two"), JobConfig(nproc=2))
    assert two["world_size"] == 2
    one = train(_config(tmp_path / "one"))
    assert one.world_size == 1
    assert abs(two["test"]["hr@10"] - one.test_metrics["hr@10"]) <= TOLERANCE_HR10, (
        two["test"]["hr@10"],
        one.test_metrics["hr@10"],
    )
    model, saved = load_model(tmp_path / "two" / "model.pt")
    assert saved.model.model == "hstu" and model.num_items == 300
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


def _k8s_job(**changes: object) -> JobConfig:
    values: dict = dict(scheduler="kubernetes", replicas=2, nproc=4, cpus=8, memory_mb=32_768,
                        gpus=4, image="registry.example/candgen/platform:1", queue="training",
                        namespace="ml", service_account="trainer", work_volume="shared-work",
                        work_dir="/mnt/work")  # fmt: skip
    values.update(changes)
    return JobConfig(**values)


def test_the_kubernetes_job_comes_from_torchx_dry_run(tmp_path: Path) -> None:
    job = kubernetes_job(_config(tmp_path), _k8s_job())
    assert job["apiVersion"] == "batch.volcano.sh/v1alpha1" and job["kind"] == "Job"
    assert job["metadata"]["name"].startswith("candgen-train-hstu-")
    assert job["spec"]["queue"] == "training" and job["spec"]["schedulerName"] == "volcano"
    tasks = job["spec"]["tasks"]
    assert [t["replicas"] for t in tasks] == [1, 1]  # one Volcano task (pod) per replica
    for task in tasks:
        pod = task["template"]["spec"]
        assert pod["serviceAccountName"] == "trainer"
        (container,) = pod["containers"]
        assert container["image"] == "registry.example/candgen/platform:1"
        limits = container["resources"]["limits"]
        assert limits == {"cpu": "8000m", "memory": "32768M", "nvidia.com/gpu": "4"}
        command = " ".join(container["command"])
        assert "--nnodes 2 --nproc_per_node 4" in command
        assert "-m candgen.cli train" in command and "--dataset planted" in command
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}  # fmt: skip
        assert [mounts[name] for name, claim in claims.items() if claim == "shared-work"] == [
            "/mnt/work"
        ]


def test_a_cpu_job_asks_for_no_gpu(tmp_path: Path) -> None:
    job = kubernetes_job(_config(tmp_path), _k8s_job(gpus=0, replicas=1, nproc=2))
    (task,) = job["spec"]["tasks"]
    limits = task["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits and limits["cpu"] == "8000m"


def test_the_kubernetes_command_waits_on_volcano_and_never_builds_the_cwd(tmp_path: Path) -> None:
    cmd = torchx_command(_config(tmp_path), _k8s_job())
    assert cmd[1:6] == ["run", "-s", "kubernetes", "--workspace", ""]
    assert cmd[cmd.index("-cfg") + 1] == "queue=training,namespace=ml,service_account=trainer"
    assert "--wait" in cmd and "type=volume,src=shared-work,dst=/mnt/work" in cmd


def test_a_dry_run_is_for_the_kubernetes_scheduler(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^scheduler: "):
        kubernetes_job(_config(tmp_path), JobConfig())


def test_the_inputs_are_staged_on_the_shared_volume(tmp_path: Path) -> None:
    data, features = tmp_path / "in" / "data", tmp_path / "in" / "features"
    for folder in (data, features):
        folder.mkdir(parents=True)
        (folder / "part.parquet").write_bytes(b"x")
    config = replace(_config(tmp_path / "out"), data_dir=str(data), features_dir=str(features))
    (tmp_path / "work").mkdir()
    staged = stage_on_volume(config, _k8s_job(work_dir=str(tmp_path / "work")), name="j1")
    root = tmp_path / "work" / "jobs" / "j1"
    assert staged.data_dir == str(root / "data_dir")
    assert staged.features_dir == str(root / "features_dir")
    assert staged.out_dir == str(root / "out")
    assert (root / "data_dir" / "part.parquet").read_bytes() == b"x"
    assert (root / "features_dir" / "part.parquet").exists()
    assert (staged.model, staged.epochs) == (config.model, config.epochs)


def test_an_unmounted_work_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^work_dir: .*mount the shared-work volume"):
        launch(_config(tmp_path), _k8s_job(work_dir=str(tmp_path / "missing")))


def test_cli_prints_the_dry_run_job() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "candgen.cli", "train", "--scheduler", "kubernetes", "--dryrun",
         "--image", "reg/candgen:1", "--replicas", "2", "--nproc", "1", "--gpus", "1",
         "--dataset", "games", "--model", "hstu"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    import yaml

    job = yaml.safe_load(proc.stdout)
    assert job["kind"] == "Job" and len(job["spec"]["tasks"]) == 2
    container = job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]
    assert container["image"] == "reg/candgen:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--model hstu" in " ".join(container["command"])


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--scheduler", "slurm"], "scheduler"),
        (["--dryrun"], "scheduler"),
        (["--scheduler", "kubernetes", "--replicas", "0", "--dryrun"], "replicas"),
        (["--scheduler", "kubernetes", "--image", "", "--dryrun"], "image"),
        (["--scheduler", "kubernetes", "--gpus", "-1", "--dryrun"], "gpus"),
        (["--replicas", "2"], "replicas"),
    ],
)
def test_cli_rejects_a_bad_job_naming_the_field(flags: list[str], field: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "candgen.cli", "train", *flags],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"{field}: " in proc.stderr
