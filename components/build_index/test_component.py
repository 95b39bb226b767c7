from __future__ import annotations

from pathlib import Path

import pytest
from kfp.dsl import Artifact, Metrics

from candgen.errors import ConfigError
from components.build_index.component import build_index


@pytest.mark.integration
def test_python_func_indexes_the_version_and_logs_recall(
    registered_uri: str, tracking_uri: str, tmp_path: Path
) -> None:
    index, metrics = Artifact(uri=str(tmp_path / "i")), Metrics(uri=str(tmp_path / "m"))
    recall = build_index.python_func(
        model_uri=registered_uri, index=index, metrics=metrics, tracking_uri=tracking_uri
    )
    assert 0.95 <= recall <= 1.0 and metrics.metadata["recall_at_100"] == recall
    assert (tmp_path / "i" / "ads.faiss").exists()
    assert index.metadata["kind"] == "flat" and index.metadata["size"] > 0


def test_a_bad_parameter_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^kind:"):
        build_index.python_func(
            model_uri="models:/m/1",
            index=Artifact(uri=str(tmp_path / "i")),
            metrics=Metrics(uri=str(tmp_path / "m")),
            kind="lsh",
        )
