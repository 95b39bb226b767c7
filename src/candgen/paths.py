"""Where candgen finds the shared read-only data and keeps its own state by default."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

# src/candgen/paths.py -> the repository root (the package is installed editable by `make setup`).
REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """The folder of real data sets: $CANDGEN_SHARED_DATA, else ../shared/data beside the repo."""
    env = os.environ.get("CANDGEN_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def feature_repo_dir() -> Path:
    """The Feast feature repository checked in with candgen."""
    return REPO_ROOT / "feature_repo"


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Has ``write`` fill a hidden sibling of ``path``, then renames it over ``path``: a reader
    (a polling server, a resumed run) sees the old file or the new one, never half of one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    write(partial)
    os.replace(partial, path)
