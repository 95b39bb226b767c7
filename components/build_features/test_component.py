# No `from __future__ import annotations`: KFP reads the pipeline's annotations as types.
import json
from pathlib import Path

import pytest
from kfp.dsl import Dataset

from candgen.errors import ConfigError
from components.build_features.component import build_features
from components.conftest import SMALL
from components.synth_data.component import synth_data


@pytest.fixture(scope="module")
def marketplace(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    out = Dataset(uri=str(tmp_path_factory.mktemp("market") / "m"))
    synth_data.python_func(marketplace=out, **SMALL)
    return out


def test_python_func_writes_the_feature_tables(marketplace: Dataset, tmp_path: Path) -> None:
    features = Dataset(uri=str(tmp_path / "f"))
    snapshot = build_features.python_func(
        marketplace=marketplace, features=features, short_seq_len=8, embed_text=False
    )
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["snapshot"] == snapshot == features.metadata["snapshot"]
    assert manifest["config"]["short_seq_len"] == 8
    assert features.metadata["ad_attributes"] == SMALL["ads"]


def test_a_bad_parameter_names_the_field(marketplace: Dataset, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^short_seq_len:"):
        build_features.python_func(
            marketplace=marketplace,
            features=Dataset(uri=str(tmp_path / "f")),
            short_seq_len=0,
            embed_text=False,
        )


@pytest.mark.integration
def test_runs_under_kfp_local_on_a_synthesized_marketplace(kfp_local: Path) -> None:
    from kfp import dsl

    @dsl.pipeline
    def two_steps() -> str:
        market = synth_data(**SMALL)
        feats = build_features(marketplace=market.outputs["marketplace"], embed_text=False)
        return feats.outputs["Output"]

    run = two_steps()
    assert len(run.output) == 64  # the feature tables' snapshot hash
