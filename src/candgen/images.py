"""The container images candgen runs in: one source of truth for components, manifests and the
Dockerfiles under docker/ (a test checks that each one named here is built there)."""

from __future__ import annotations

from typing import Final

REGISTRY: Final = "ghcr.io/candgen"
VERSION: Final = "0.1.0"
# Every KFP component runs in the platform image (Feast, MLflow, TorchX, torch, candgen).
PLATFORM_IMAGE: Final = f"{REGISTRY}/platform:{VERSION}"
# Triton with the serving environment (numpy<2 for the python backend, torch, FAISS, candgen).
SERVING_IMAGE: Final = f"{REGISTRY}/serving:{VERSION}"
