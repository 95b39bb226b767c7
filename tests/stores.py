"""A Feast store applied and materialized on the small marketplace's features, for integration
tests (SQLite, or the Redis at 127.0.0.1:6379, whose keys are namespaced by the project)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from candgen.features.store import StoreConfig, apply, materialize, open_store


@contextmanager
def applied_store(
    online: str, features_dir: Path, tmp_path_factory: pytest.TempPathFactory, name: str
) -> Iterator[StoreConfig]:
    cfg = StoreConfig(
        online=online,
        features_dir=features_dir,
        state_dir=tmp_path_factory.mktemp(f"{name}_{online}"),
        project=f"candgen_{name}_{os.getpid()}",
    )
    apply(cfg)
    materialize(cfg)
    try:
        yield cfg
    finally:
        open_store(cfg).teardown()  # removes this project's keys from Redis
