"""The checking tools of .venv-tools (kubectl with kustomize, kubernetes-validate, checkov,
hadolint), built by `make setup` beside the platform environment."""

from __future__ import annotations

import subprocess
from typing import Any

import yaml

from candgen.paths import REPO_ROOT

TOOLS_BIN = REPO_ROOT / ".venv-tools" / "bin"
OVERLAYS = ("local", "prod")


def tool(name: str) -> str:
    path = TOOLS_BIN / name
    if not path.exists():
        raise AssertionError(f"{path} is missing: run `make setup` (it builds .venv-tools)")
    return str(path)


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool(name), *args], capture_output=True, text=True, cwd=REPO_ROOT)


def render(overlay: str) -> str:
    """The manifests of k8s/overlays/<overlay>, as `kubectl kustomize` prints them."""
    proc = run_tool("kubectl", "kustomize", str(REPO_ROOT / "k8s" / "overlays" / overlay))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def objects(rendered: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def pod_specs(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pod template of every workload, by workload name."""
    return {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objs
            if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")}  # fmt: skip
