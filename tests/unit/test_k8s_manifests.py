"""k8s/: every overlay renders with kustomize, validates against the Kubernetes schemas (1.30 and
the newest the validator knows), and passes checkov; and it says what the platform needs."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from candgen.paths import REPO_ROOT
from candgen.training.config import JobConfig
from tests.tools import OVERLAYS, objects, pod_specs, render, run_tool

CHECKOV_CONFIG = REPO_ROOT / "k8s" / ".checkov.yaml"


@cache
def _objects(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(objects(render(overlay)))


def _one(overlay: str, kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in _objects(overlay) if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _container(overlay: str, workload: str) -> dict[str, Any]:
    return pod_specs(list(_objects(overlay)))[workload]["containers"][0]


@pytest.fixture(params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / f"{request.param}.yaml"
    path.write_text(render(request.param))
    return path


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_every_object_validates_against_the_kubernetes_schema(rendered: Path, version: str) -> None:
    proc = run_tool("kubernetes-validate", "--strict", "-k", version, str(rendered))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    objs = objects(rendered.read_text())
    assert proc.stdout.count(" passed for resource ") == len(objs)
    expected = {"Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler",
                "PodDisruptionBudget", "NetworkPolicy", "PersistentVolumeClaim"}  # fmt: skip
    assert expected <= {o["kind"] for o in objs}


def test_a_schema_violation_is_caught(tmp_path: Path) -> None:
    # The validator must be able to fail: a Deployment with a misspelt field.
    bad = render("local").replace("revisionHistoryLimit:", "revisionHistoryLimt:", 1)
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    proc = run_tool("kubernetes-validate", "--strict", "-k", "1.30.0", str(path))
    assert proc.returncode != 0 and "revisionHistoryLimt" in proc.stdout + proc.stderr


def test_checkov_finds_no_failed_check(rendered: Path) -> None:
    proc = run_tool("checkov", "-f", str(rendered), "--config-file", str(CHECKOV_CONFIG),
                    "--output", "json", "--quiet", "--compact")  # fmt: skip
    report = json.loads(proc.stdout)
    summary = report["summary"]
    failed = [f"{c['check_id']} {c['resource']}" for c in report["results"]["failed_checks"]]
    assert summary["failed"] == 0 and failed == [], failed
    assert summary["passed"] > 100 and proc.returncode == 0  # it really checked the workloads


def test_every_checkov_skip_is_justified() -> None:
    lines = CHECKOV_CONFIG.read_text().splitlines()
    skips = [i for i, line in enumerate(lines) if re.match(r"\s*- CKV", line)]
    assert skips, "the config skips nothing: drop this test's expectation"
    for i in skips:
        assert lines[i - 1].lstrip().startswith("#"), f"skip without a reason: {lines[i]}"


def test_checkov_fails_a_root_privileged_pod(tmp_path: Path) -> None:
    bad = render("local").replace("allowPrivilegeEscalation: false",
                                  "allowPrivilegeEscalation: true", 1)  # fmt: skip
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    proc = run_tool("checkov", "-f", str(path), "--config-file", str(CHECKOV_CONFIG),
                    "--output", "json", "--quiet", "--compact")  # fmt: skip
    assert json.loads(proc.stdout)["summary"]["failed"] >= 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_is_probed_sized_and_scaled(overlay: str) -> None:
    container = _container(overlay, "candgen-triton")
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    pod = pod_specs(list(_objects(overlay)))["candgen-triton"]
    shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == shm[0]["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    assert int(volume["emptyDir"]["sizeLimit"].removesuffix("Gi")) >= 1  # Docker's 64 MB is not
    gpu = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpu == ("1" if overlay == "prod" else None)
    ports = {p["port"] for p in _one(overlay, "Service", "candgen-triton")["spec"]["ports"]}
    assert ports == {8000, 8001, 8002}
    hpa = _one(overlay, "HorizontalPodAutoscaler", "candgen-triton")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "candgen-triton"}  # fmt: skip
    assert hpa["minReplicas"] == (2 if overlay == "prod" else 1) <= hpa["maxReplicas"]
    pdb = _one(overlay, "PodDisruptionBudget", "candgen-triton")["spec"]
    assert pdb["selector"]["matchLabels"] == {"app.kubernetes.io/name": "candgen-triton"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_reads_features_through_its_sidecar_at_the_exports_default_url(
    overlay: str,
) -> None:
    from urllib.parse import urlsplit

    from candgen.serving.steps import ServingConfig

    pod = pod_specs(list(_objects(overlay)))["candgen-triton"]
    (sidecar,) = [c for c in pod["containers"] if c["name"] == "online-reads"]
    assert sidecar["command"] == ["candgen", "features", "serve", "--lean"]
    assert (
        "--online=redis" in sidecar["args"] and "--state-dir=$(FEAST_STATE_DIR)" in sidecar["args"]
    )
    url = urlsplit(ServingConfig().feature_server_url)
    assert url.hostname == "127.0.0.1" and f"--port={url.port}" in sidecar["args"]
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/health"
    redis = _one(overlay, "NetworkPolicy", "candgen-redis")["spec"]["ingress"][0]["from"]
    callers = [c["podSelector"]["matchLabels"].get("app.kubernetes.io/name") for c in redis]
    assert "candgen-triton" in callers


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_serves_the_repository_the_pipeline_deploys_to(overlay: str) -> None:
    job = JobConfig()
    args = _container(overlay, "candgen-triton")["args"]
    (repository,) = [a.split("=", 1)[1] for a in args if a.startswith("--model-repository=")]
    assert repository.startswith(job.work_dir + "/")
    claims = {v["persistentVolumeClaim"]["claimName"]
              for v in pod_specs(list(_objects(overlay)))["candgen-triton"]["volumes"]
              if "persistentVolumeClaim" in v}  # fmt: skip
    assert claims == {job.work_volume}
    claim = _one(overlay, "PersistentVolumeClaim", job.work_volume)
    assert claim["metadata"]["namespace"] == job.namespace
    account = _one(overlay, "ServiceAccount", job.service_account)
    assert account["metadata"]["namespace"] == job.namespace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_feast_mlflow_and_the_pipeline_root_are_configured(overlay: str) -> None:
    feast = _container(overlay, "candgen-feast")
    assert feast["command"] == ["candgen", "features", "serve"]
    assert "--online=redis" in feast["args"] and "--state-dir=$(FEAST_STATE_DIR)" in feast["args"]
    # where the pipeline's feature_store step publishes the registry (feature_registry_dir)
    config = _one(overlay, "ConfigMap", "candgen-config")["data"]
    assert config["FEAST_STATE_DIR"].startswith(JobConfig().work_dir + "/")
    mlflow = _container(overlay, "candgen-mlflow")
    assert any(a.startswith("--backend-store-uri=postgresql+psycopg2://") for a in mlflow["args"])
    root = _one(overlay, "ConfigMap", "kfp-launcher")["data"]["defaultPipelineRoot"]
    assert root.startswith("gs://" if overlay == "prod" else "minio://")
    artifacts = _one(overlay, "ConfigMap", "candgen-config")["data"]
    destination = artifacts["MLFLOW_ARTIFACTS_DESTINATION"]
    assert destination.startswith("gs://" if overlay == "prod" else "/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_only_referenced(overlay: str) -> None:
    objs = list(_objects(overlay))
    assert not [o for o in objs if o["kind"] == "Secret"]
    secret_words = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY$|CREDENTIALS", re.IGNORECASE)
    for name, pod in pod_specs(objs).items():
        for container in pod["containers"]:
            for env in container.get("env", []):
                if secret_words.search(env["name"]):
                    # a path to a mounted Secret, or a reference; never the value itself
                    assert env["name"].endswith("_FILE") or "valueFrom" in env, (name, env)
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] == "candgen-mlflow-db"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_is_denied_by_default_and_each_pod_admits_its_callers(overlay: str) -> None:
    objs = list(_objects(overlay))
    policies = [o["spec"] for o in objs if o["kind"] == "NetworkPolicy"]
    assert {"podSelector": {}, "policyTypes": ["Ingress"]} in policies  # default deny
    for o in objs:
        if o["kind"] not in ("Deployment", "StatefulSet"):
            continue
        labels = o["spec"]["template"]["metadata"]["labels"]
        allowing = [
            p
            for p in policies
            if p.get("ingress")
            and all(labels.get(k) == v for k, v in p["podSelector"].get("matchLabels", {}).items())
        ]
        assert allowing, f"{o['metadata']['name']} is unreachable"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_unprivileged(overlay: str) -> None:
    for name, pod in pod_specs(list(_objects(overlay))).items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] >= 10000, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["capabilities"]["drop"] == ["ALL"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ad_shards_are_a_statefulset_each_pod_serving_its_own_shard(overlay: str) -> None:
    from candgen.endpoint.export import ExportConfig
    from candgen.serving.steps import ServingConfig

    shards = _one(overlay, "StatefulSet", "candgen-ad-shard")["spec"]
    service = _one(overlay, "Service", "candgen-ad-shard")["spec"]
    assert shards["serviceName"] == "candgen-ad-shard" and service["clusterIP"] == "None"
    assert shards["replicas"] >= 2
    container = shards["template"]["spec"]["containers"][0]
    (env,) = [e for e in container["env"] if e["name"] == "SHARD"]
    assert (
        env["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    (repository,) = [
        a.split("=", 1)[1] for a in container["args"] if a.startswith("--model-repository=")
    ]
    assert repository.endswith("/shard-$(SHARD)")
    # where an export beside the deployed repository writes the shards (ExportConfig.shards_dir)
    (served,) = [a.split("=", 1)[1] for a in _container(overlay, "candgen-triton")["args"]
                 if a.startswith("--model-repository=")]  # fmt: skip
    exported = ExportConfig(model_uri="models:/m@a", out=served).shards_dir
    assert repository == f"{exported}/shard-$(SHARD)"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    grpc = {p["name"]: p["port"] for p in service["ports"]}["grpc"]
    urls = tuple(f"candgen-ad-shard-{i}.candgen-ad-shard:{grpc}" for i in range(shards["replicas"]))
    assert ServingConfig(ad_shard_urls=urls).ad_shard_urls == urls  # what the comment says to pass
    policy = _one(overlay, "NetworkPolicy", "candgen-ad-shard")["spec"]
    callers = [c["podSelector"]["matchLabels"] for c in policy["ingress"][0]["from"]]
    assert callers == [{"app.kubernetes.io/name": "candgen-triton"}]
