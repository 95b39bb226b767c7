"""The container images candgen runs in: one source of truth for the components, the manifests
under k8s/ and the Dockerfiles under docker/ (tests/unit/test_images.py checks that every image
named anywhere is one of these, built by its Dockerfile here).

    python -m candgen.images build [--push]     # make images / make push-images
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from typing import Final, NamedTuple

from candgen.errors import CandgenError
from candgen.paths import REPO_ROOT

REGISTRY: Final = "ghcr.io/candgen"
VERSION: Final = "0.1.0"
# Every KFP component, the TorchX training pods, the Feast feature server and MLflow run in the
# platform image (Feast, MLflow, TorchX, torch, candgen).
PLATFORM_IMAGE: Final = f"{REGISTRY}/platform:{VERSION}"
# Triton with the serving environment (numpy<2 for the python backend, torch, FAISS, candgen).
SERVING_IMAGE: Final = f"{REGISTRY}/serving:{VERSION}"
# Upstream Redis and PostgreSQL, rebuilt here to run as a fixed non-root uid.
REDIS_IMAGE: Final = f"{REGISTRY}/redis:{VERSION}"
POSTGRES_IMAGE: Final = f"{REGISTRY}/postgres:{VERSION}"


class Build(NamedTuple):
    """How one image is built: its Dockerfile and build context, relative to the repository."""

    dockerfile: str
    context: str


BUILDS: Final[dict[str, Build]] = {
    PLATFORM_IMAGE: Build("docker/platform/Dockerfile", "."),
    SERVING_IMAGE: Build("docker/serving/Dockerfile", "."),
    REDIS_IMAGE: Build("docker/redis/Dockerfile", "docker/redis"),
    POSTGRES_IMAGE: Build("docker/postgres/Dockerfile", "docker/postgres"),
}


def build_commands(push: bool = False) -> list[list[str]]:
    """The `docker build` (and `docker push`) command lines for every image, in order."""
    commands = []
    for image, build in BUILDS.items():
        commands.append(["docker", "build", "-f", build.dockerfile, "-t", image, build.context])
        if push:
            commands.append(["docker", "push", image])
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m candgen.images", description=__doc__)
    parser.add_argument("action", choices=["build", "list"])
    parser.add_argument("--push", action="store_true", help="push each image after building it")
    args = parser.parse_args(argv)
    if args.action == "list":
        for image, build in BUILDS.items():
            print(f"{image}\t{build.dockerfile}")
        return 0
    if not shutil.which("docker"):
        raise CandgenError("docker is not on PATH: building the images needs a Docker engine")
    for cmd in build_commands(args.push):
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, cwd=REPO_ROOT, check=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (CandgenError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
