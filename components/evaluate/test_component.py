from __future__ import annotations

from pathlib import Path

import pytest
from kfp.dsl import Metrics

from candgen.errors import ConfigError
from components.evaluate.component import evaluate


@pytest.mark.integration
def test_python_func_scores_the_model_beside_popularity(
    trainable_data: tuple, trained_model: tuple, tmp_path: Path
) -> None:
    market, features = trainable_data
    trained, train_metrics, _ = trained_model
    metrics = Metrics(uri=str(tmp_path / "metrics"))
    value = evaluate.python_func(
        marketplace=market, features=features, trained=trained, metrics=metrics
    )
    assert value == pytest.approx(metrics.metadata["ndcg@10"])
    # The same model on the same split gives what training measured.
    assert value == pytest.approx(train_metrics.metadata["ndcg@10"], abs=1e-6)
    assert 0.0 <= metrics.metadata["popularity.ndcg@10"] <= 1.0


@pytest.mark.integration
def test_an_unknown_split_is_a_clear_error(
    trainable_data: tuple, trained_model: tuple, tmp_path: Path
) -> None:
    market, features = trainable_data
    with pytest.raises(ConfigError, match=r"^split: must be 'valid' or 'test', got 'train'"):
        evaluate.python_func(
            marketplace=market,
            features=features,
            trained=trained_model[0],
            metrics=Metrics(uri=str(tmp_path / "m")),
            split="train",
        )
