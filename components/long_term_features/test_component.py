# No `from __future__ import annotations`: KFP reads the pipeline's annotations as types.
import json
from pathlib import Path

import pandas as pd
import pytest
from kfp.dsl import Dataset, Model

from candgen.errors import ConfigError
from components.long_term_features.component import long_term_features


@pytest.mark.integration
def test_python_func_adds_the_summaries_through_a_torchx_job(
    trainable_data: tuple, tmp_path: Path
) -> None:
    market, features = trainable_data
    out, summariser = Dataset(uri=str(tmp_path / "f")), Model(uri=str(tmp_path / "s"))
    snapshot = long_term_features.python_func(
        marketplace=market,
        features=features,
        with_long_term=out,
        summariser=summariser,
        epochs=2,
        nproc=1,
    )
    table = pd.read_parquet(tmp_path / "f" / "user_long_term_embedding.parquet")
    assert len(table) == out.metadata["long_term_rows"] > 0
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["snapshot"] == snapshot and manifest["long_term"]["dim"] == 64
    assert (tmp_path / "s" / "model.pt").exists()
    # The upstream tables stay as they were: the step writes a new artifact.
    upstream = pd.read_parquet(Path(features.path) / "user_long_term_embedding.parquet")
    assert len(upstream) == 0


def test_a_bad_parameter_names_the_field(trainable_data: tuple, tmp_path: Path) -> None:
    market, features = trainable_data
    for kwargs, field in (
        ({"eval_days": 0}, "eval_days"),
        ({"nproc": 0}, "nproc"),
        ({"all_action_days": 0.0}, "all_action_days"),
    ):
        with pytest.raises(ConfigError, match=rf"^{field}:"):
            long_term_features.python_func(
                marketplace=market,
                features=features,
                with_long_term=Dataset(uri=str(tmp_path / "f")),
                summariser=Model(uri=str(tmp_path / "s")),
                **kwargs,
            )
