"""The compiled pipeline is checked in and must match the code; parameters parse by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from candgen.errors import ConfigError
from candgen.orchestrate import PIPELINE_YAML, compile_pipeline, parse_overrides


def test_the_checked_in_pipeline_yaml_matches_the_code(tmp_path: Path) -> None:
    fresh = compile_pipeline(tmp_path / "pipeline.yaml").read_text()
    assert fresh == PIPELINE_YAML.read_text(), (
        "pipelines/pipeline.yaml is stale: run `candgen pipeline compile` and commit it"
    )


def test_the_deploying_steps_sit_behind_the_gate() -> None:
    text = PIPELINE_YAML.read_text()
    assert "triggerPolicy" in text and "promoted" in text
    for step in ("build-index", "export-repository", "deploy"):
        assert f"comp-{step}" in text


def test_overrides_are_typed_by_the_pipeline_signature() -> None:
    got = parse_overrides(["epochs=5", "lr=0.01", "embed_text=false", "model=sasrec"])
    assert got == {"epochs": 5, "lr": 0.01, "embed_text": False, "model": "sasrec"}


@pytest.mark.parametrize(("pair", "message"), [
    ("epoch=5", r"^epoch: not a pipeline parameter"),
    ("epochs=five", r"^epochs: expected int, got 'five'"),
    ("embed_text=maybe", r"^embed_text: expected bool"),
    ("epochs", r"^epochs: not a pipeline parameter; expected NAME=VALUE"),
])  # fmt: skip
def test_bad_overrides_name_the_parameter(pair: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_overrides([pair])


def test_the_steps_that_share_files_mount_the_claim_on_a_cluster() -> None:
    import yaml

    from candgen.training.config import JobConfig

    _, platform = yaml.safe_load_all(PIPELINE_YAML.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    # The summariser and the model train as TorchX jobs that stage their data on the claim.
    assert set(executors) == {"exec-long-term-features", "exec-feature-store", "exec-train",
                              "exec-deploy"}  # fmt: skip
    for executor in executors.values():
        (mount,) = executor["pvcMount"]
        assert mount["mountPath"] == JobConfig().work_dir
        assert mount["pvcNameParameter"]["componentInputParameter"].endswith("work_volume")
