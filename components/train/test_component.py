from __future__ import annotations

from pathlib import Path

import pytest
from kfp.dsl import Metrics, Model

from candgen.errors import ConfigError
from candgen.registry.tracking import client
from components.train.component import train


@pytest.mark.integration
def test_python_func_trains_through_torchx_and_logs_the_run(
    trained_model: tuple, tracking_uri: str
) -> None:
    trained, metrics, run_id = trained_model
    assert (Path(trained.path) / "model.pt").exists()
    assert trained.metadata["run_id"] == run_id
    run = client(tracking_uri).get_run(run_id)
    assert run.data.params["model"] == "unified"
    assert metrics.metadata["ndcg@10"] == pytest.approx(run.data.metrics["test.ndcg_at_10"])


def test_a_bad_parameter_names_the_field(trainable_data: tuple, tmp_path: Path) -> None:
    market, features = trainable_data
    with pytest.raises(ConfigError, match=r"^model:"):
        train.python_func(
            marketplace=market,
            features=features,
            trained=Model(uri=str(tmp_path / "m")),
            metrics=Metrics(uri=str(tmp_path / "x")),
            model="gpt",
        )


@pytest.mark.parametrize(
    ("job", "field"),
    [
        ({"scheduler": "slurm"}, "scheduler"),
        ({"scheduler": "kubernetes", "replicas": 0}, "replicas"),
        ({"gpus": -1}, "gpus"),
        # The pod that launches a kubernetes job must mount the shared volume it stages on.
        ({"scheduler": "kubernetes", "work_dir": "/nonexistent/candgen"}, "work_dir"),
    ],
)
def test_a_bad_job_parameter_names_the_field(
    trainable_data: tuple, tmp_path: Path, job: dict, field: str
) -> None:
    market, features = trainable_data
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        train.python_func(
            marketplace=market,
            features=features,
            trained=Model(uri=str(tmp_path / "m")),
            metrics=Metrics(uri=str(tmp_path / "x")),
            **job,
        )
