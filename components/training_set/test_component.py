from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from kfp.dsl import Artifact, Dataset

from candgen.errors import ConfigError
from components.feature_store.component import feature_store
from components.training_set.component import training_set


@pytest.fixture(scope="module")
def store(trainable_data: tuple, tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    out = Artifact(uri=str(tmp_path_factory.mktemp("store") / "s"))
    feature_store.python_func(features=trainable_data[1], store=out)
    return out


@pytest.mark.integration
def test_python_func_joins_features_point_in_time(
    trainable_data: tuple, store: Artifact, tmp_path: Path
) -> None:
    market, features = trainable_data
    rows = Dataset(uri=str(tmp_path / "rows"))
    n = training_set.python_func(
        marketplace=market, features=features, store=store, rows=rows, limit=300
    )
    df = pd.read_parquet(tmp_path / "rows" / "training_set.parquet")
    assert n == len(df) == 300 == rows.metadata["rows"]
    assert {"label", "recent_item_ids", "ctr_7d"} <= set(df.columns)
    assert set(df["label"].unique()) <= {0, 1}


@pytest.mark.integration
def test_a_bad_parameter_names_the_field(
    trainable_data: tuple, store: Artifact, tmp_path: Path
) -> None:
    market, features = trainable_data
    with pytest.raises(ConfigError, match=r"^limit:"):
        training_set.python_func(
            marketplace=market,
            features=features,
            store=store,
            rows=Dataset(uri=str(tmp_path / "r")),
            limit=-1,
        )
