"""The whole retrieval pipeline under kfp.local: a first model ships; a refused one does not."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from candgen.cli import main
from candgen.registry.tracking import client
from candgen.serving.steps import pinned_version

pytestmark = pytest.mark.integration


def test_the_pipeline_ships_a_passing_model_and_holds_back_a_refused_one(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client(uri).create_experiment("pipe", artifact_location=(tmp_path / "art").as_uri())
    target = tmp_path / "served"
    args = ["pipeline", "run", "--local", "--pipeline-root", str(tmp_path / "root")]
    for pair in ("users=150", "ads=200", "days=6", "seed=5", "embed_text=false", "epochs=1",
                 "long_term_epochs=1", "max_len=20", "nproc=1", "model_name=pipe-m",
                 f"tracking_uri={uri}", "experiment=pipe",
                 f"target_repository={target}"):  # fmt: skip
        args += ["--set", pair]

    assert main(args) == 0
    out = capsys.readouterr().out
    assert "gate passed: pipe-m v1 is the champion" in out
    assert pinned_version(target) == 1
    # the run ends with one line per step saying what it did
    assert re.search(r"^  train +MLflow run \w+: test ndcg@10 \d", out, re.M)
    assert re.search(rf"^  deploy +v1 installed in {re.escape(str(target))}", out, re.M)
    assert re.search(r"^  long-term-features +[\d,]+ daily long-term summaries", out, re.M)
    assert re.search(r"^  learn-quotas +quotas learned from [\d,]+ logged requests", out, re.M)
    select = target / "candgen_select" / "1"
    assert (select / "quotas.json").exists()  # the unified model with the learned quotas
    assert '"quota_policy": "learned"' in (select / "serving.json").read_text()

    # A champion no model can beat: the next run's model is registered but not deployed.
    client(uri).set_model_version_tag("pipe-m", "1", "primary_metric_value", "1.0")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "gate refused v2" in out and "nothing is deployed" in out
    assert re.search(r"^  gate-open +closed: nothing is deployed$", out, re.M)
    for step in ("build-index", "learn-quotas", "export-repository", "deploy"):
        assert re.search(rf"^  {step} +not run: the gate is closed$", out, re.M), step
    assert pinned_version(target) == 1
    assert not (target / "retrieve" / "2").exists()
