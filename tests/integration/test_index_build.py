"""Building the serving index from a registered version, with recall logged to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from candgen.cli import main
from candgen.index.ann import AdIndex
from candgen.registry import tracking
from candgen.training.config import TrainConfig
from candgen.training.trainer import train

pytestmark = pytest.mark.integration


def test_index_from_a_registered_version(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mc = tracking.client(uri)
    mc.create_experiment("idx", artifact_location=(tmp_path / "art").as_uri())
    train(TrainConfig(dataset="planted", model="hstu", epochs=2, max_len=20, batch_size=64,
                      progress=False, tracking_uri=uri, experiment="idx", register_as="idx-m",
                      out_dir=str(tmp_path / "run")))  # fmt: skip
    tracking.promote("idx-m", uri)

    out = str(tmp_path / "index")
    rc = main(["index", "build", "--model-uri", "models:/idx-m@champion", "--all-items",
               "--kind", "hnsw", "--out", out, "--tracking-uri", uri])  # fmt: skip
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "hnsw" and summary["size"] == 300
    assert 0.95 <= summary["recall_at_100"] <= 1.0

    version = mc.get_model_version_by_alias("idx-m", "champion")
    assert version.tags["index_kind"] == "hnsw"
    assert float(version.tags["index_recall_at_100"]) == pytest.approx(summary["recall_at_100"])
    assert mc.get_run(version.run_id).data.metrics["index.recall_at_100"] == pytest.approx(
        summary["recall_at_100"]
    )
    loaded = AdIndex.load(tmp_path / "index" / "ads.faiss")
    assert len(loaded) == 300


def test_ads_only_on_a_set_without_ads_is_a_clear_error(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.client(uri).create_experiment("idx", artifact_location=(tmp_path / "a").as_uri())
    train(TrainConfig(dataset="planted", model="sasrec", epochs=1, max_len=20, batch_size=64,
                      progress=False, tracking_uri=uri, experiment="idx", register_as="m",
                      out_dir=str(tmp_path / "run")))  # fmt: skip
    rc = main(["index", "build", "--model-uri", "models:/m@challenger", "--out",
               str(tmp_path / "i"), "--tracking-uri", uri])  # fmt: skip
    assert rc == 2
    assert "holds no ad embeddings" in capsys.readouterr().err
    assert main(["index", "build", "--model-uri", "models:/nope@champion", "--tracking-uri",
                 uri]) == 2  # fmt: skip
    assert "model_uri: cannot load" in capsys.readouterr().err
