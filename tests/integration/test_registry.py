"""MLflow runs, registration, alias moves and refused promotion on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from candgen.errors import CandgenError
from candgen.registry import tracking
from candgen.training.config import TrainConfig
from candgen.training.trainer import train

pytestmark = pytest.mark.integration

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


@pytest.fixture(params=["sqlite", "postgresql"])
def tracking_uri(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mlflow.db'}"
        return
    import psycopg2

    db = f"candgen_test_{os.getpid()}"
    admin = psycopg2.connect(dbname="postgres", **PG)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {db}")
        cur.execute(f"CREATE DATABASE {db}")
    try:
        yield f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{db}"
    finally:
        from sqlalchemy.orm import close_all_sessions

        close_all_sessions()
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        admin.close()


def _train(uri: str, tmp_path: Path, name: str, **kw: object) -> dict:
    mc = tracking.client(uri)
    if mc.get_experiment_by_name("registry-test") is None:
        mc.create_experiment("registry-test", artifact_location=(tmp_path / "art").as_uri())
    cfg = TrainConfig(**({"dataset": "planted", "model": "sasrec", "seed": 42, "epochs": 4,
                          "batch_size": 64, "max_len": 20, "eval_every": 2, "progress": False,
                          "tracking_uri": uri, "experiment": "registry-test",
                          "register_as": name, "out_dir": str(tmp_path / f"run{len(kw)}")}
                         | kw))  # type: ignore[arg-type]  # fmt: skip
    result = train(cfg)
    return result.extra | {"test": result.test_metrics}


def test_register_promote_and_refuse(tracking_uri: str, tmp_path: Path) -> None:
    name = "planted-sasrec"
    first = _train(tracking_uri, tmp_path, name)
    assert first["registered"]["version"] == "1"
    assert first["registered"]["alias"] == "challenger"

    mc = tracking.client(tracking_uri)
    run = mc.get_run(first["run_id"])
    assert run.data.params["model"] == "sasrec"
    assert run.data.metrics["test.ndcg_at_10"] == pytest.approx(first["test"]["ndcg@10"])
    assert len(mc.get_metric_history(first["run_id"], "loss")) == 4
    artifacts = {a.path for a in mc.list_artifacts(first["run_id"], "plots")}
    assert artifacts == {"plots/loss.png", "plots/recall_at_k.png"}
    with open(mc.download_artifacts(first["run_id"], "plots/loss.png", str(tmp_path)), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    version = mc.get_model_version(name, "1")
    assert version.tags["data_snapshot"] == run.data.tags["data_snapshot"] != ""
    assert version.tags["git_commit"] not in ("", "unknown")
    assert version.tags["feature_service"] == "none"  # the planted set has no Feast features
    assert version.tags["primary_metric"] == "test.ndcg@10"

    promoted = tracking.promote(name, tracking_uri)
    assert promoted["status"] == "promoted" and promoted["champion"] == "1"
    assert str(mc.get_model_version_by_alias(name, "champion").version) == "1"

    # A near-untrained model (tiny learning rate, one epoch) must not take over.
    worse = _train(tracking_uri, tmp_path, name, epochs=1, lr=1e-6, eval_every=1)
    assert worse["registered"]["version"] == "2"
    assert worse["test"]["ndcg@10"] < first["test"]["ndcg@10"]
    with pytest.raises(tracking.PromotionRefused, match="refused to promote v2") as err:
        tracking.promote(name, tracking_uri)
    assert "stays on v1" in str(err.value)
    assert str(mc.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(mc.get_model_version_by_alias(name, "challenger").version) == "2"

    # The champion is a working pyfunc: history in, top-K ids out, unknown ids refused.
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(pd.DataFrame({"history": [[1, 2, 3]]}), params={"k": 7})
    assert len(out["item_ids"][0]) == 7 and not {1, 2, 3} & set(out["item_ids"][0])
    with pytest.raises(CandgenError, match="item id 4242 is not in the model's vocabulary"):
        model.predict(pd.DataFrame({"history": [[1, 4242]]}))
    with pytest.raises(CandgenError, match=r"history\[0\]: empty"):
        model.predict(pd.DataFrame({"history": [[]]}))

    described = tracking.describe(name, tracking_uri)
    assert [v["aliases"] for v in described["versions"]] == [["champion"], ["challenger"]]


def test_cli_promote_refusal_exits_2(tracking_uri: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "candgen.cli", "registry", "promote", "--name", "nothing-here",
         "--tracking-uri", tracking_uri],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no registered model 'nothing-here'" in proc.stderr


def test_registering_an_unknown_run_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "candgen.cli", "registry", "register", "--name", "m",
         "--run-id", "0123456789abcdef", "--tracking-uri", f"sqlite:///{tmp_path / 'db'}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "run_id: no run '0123456789abcdef'" in proc.stderr
