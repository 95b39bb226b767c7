"""docker/: every image named by a component, the compiled pipeline, the training job or a
manifest is built by a Dockerfile here, and every Dockerfile is pinned, non-root, secret-free
and hadolint-clean. No Docker engine runs here, so nothing is built."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from candgen.images import BUILDS, PLATFORM_IMAGE, SERVING_IMAGE
from candgen.paths import REPO_ROOT
from candgen.training.config import JobConfig
from tests.tools import OVERLAYS, objects, pod_specs, render, run_tool

DOCKERFILES = sorted((REPO_ROOT / "docker").glob("*/Dockerfile"))


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def _component_images() -> set[str]:
    from pipelines.pipeline import retrieval_pipeline

    spec = retrieval_pipeline.pipeline_spec
    executors = spec.deployment_spec["executors"]
    return {e["container"]["image"] for e in executors.values()}


def _named_images() -> dict[str, set[str]]:
    compiled, *_platform = yaml.safe_load_all(
        (REPO_ROOT / "pipelines" / "pipeline.yaml").read_text()
    )
    executors = compiled["deploymentSpec"]["executors"].values()
    named = {
        "components": _component_images(),
        "pipeline.yaml": {e["container"]["image"] for e in executors},
        "training job": {JobConfig().image},
    }
    for overlay in OVERLAYS:
        pods = pod_specs(objects(render(overlay))).values()
        named[f"k8s/overlays/{overlay}"] = {
            c["image"] for pod in pods for c in pod["containers"] + pod.get("initContainers", [])
        }
    return named


def test_every_named_image_is_built_here() -> None:
    named = _named_images()
    assert named["components"] == named["pipeline.yaml"] == {PLATFORM_IMAGE}
    assert {PLATFORM_IMAGE, SERVING_IMAGE} <= named["k8s/overlays/prod"]
    for where, images in named.items():
        for image in images:
            assert image in BUILDS, f"{where} names {image}, which no Dockerfile here builds"
            assert (REPO_ROOT / BUILDS[image].dockerfile).is_file(), image


def test_every_dockerfile_builds_a_named_image_and_says_how() -> None:
    built = {REPO_ROOT / b.dockerfile for b in BUILDS.values()}
    assert set(DOCKERFILES) == built
    for image, build in BUILDS.items():
        # the build command in the Dockerfile's header is the one `make images` runs
        header = f"docker build -f {build.dockerfile} -t {image} {build.context}"
        assert header in (REPO_ROOT / build.dockerfile).read_text(), header


def test_hadolint_passes_every_dockerfile() -> None:
    proc = run_tool("hadolint", *map(str, DOCKERFILES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install -y curl\n")
    proc = run_tool("hadolint", str(bad))
    assert proc.returncode != 0 and "DL3007" in proc.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_a_dockerfile_is_pinned_non_root_and_secret_free(dockerfile: Path) -> None:
    steps = _instructions(dockerfile)
    for word, args in steps:
        if word == "FROM":
            image = args.split()[0]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest" and re.search(r"\d", tag), f"unpinned base {image}"
        if word in ("ENV", "ARG"):
            assert not re.search(r"PASSWORD|TOKEN|SECRET|API_KEY|CREDENTIALS", args, re.I), args
        if word in ("RUN",) and "pip install" in args and "-r " not in args and "-e ." not in args:
            assert re.search(r"==|--no-deps", args), f"unpinned pip install: {args}"
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"
    assert int(users[-1].split(":")[0]) >= 10000  # the uid the manifests run as


def test_the_serving_image_carries_the_tested_serving_environment() -> None:
    serving = (REPO_ROOT / "docker" / "serving" / "Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tritonserver:" in serving
    # the lock that pins numpy<2 for the python backend, and the stub of candgen's Python
    lock = (REPO_ROOT / "requirements" / "serving.lock").read_text()
    assert re.search(r"^numpy==1\.", lock, re.M) and "requirements/serving.lock" in serving
    requires = re.search(r'requires-python = ">=(\d+\.\d+)', (REPO_ROOT / "pyproject.toml")
                         .read_text()).group(1)  # fmt: skip
    assert f"python_backend_stubs/{requires}/" in serving
    assert f"ARG PYTHON_VERSION={requires}." in serving


def test_the_images_command_lists_and_builds_every_image() -> None:
    from candgen.images import build_commands, main

    commands = build_commands(push=True)
    builds = [c for c in commands if c[1] == "build"]
    assert [c[c.index("-t") + 1] for c in builds] == list(BUILDS)
    assert [c for c in commands if c[1] == "push"] == [["docker", "push", i] for i in BUILDS]
    assert main(["list"]) == 0
