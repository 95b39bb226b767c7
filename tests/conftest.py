"""Shared fixtures: one small synthetic marketplace and its feature tables per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from candgen.data.synth import SynthConfig, SynthSummary, generate
from candgen.features.build import FeatureBuildConfig, build_features

SMALL = SynthConfig(users=300, ads=400, items=300, days=7, seed=11, chunk_users=120)


@pytest.fixture(scope="session")
def marketplace(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    return generate(SMALL, tmp_path_factory.mktemp("market") / "m", progress=False)


@pytest.fixture(scope="session")
def features_dir(marketplace: SynthSummary, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("features")
    build_features(marketplace.out_dir, out, FeatureBuildConfig(short_seq_len=8), progress=False)
    return out
