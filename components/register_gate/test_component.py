# No `from __future__ import annotations`: KFP reads the pipeline's annotations as types.
from pathlib import Path

import pytest

from candgen.registry.tracking import client
from components.register_gate.component import register_gate


@pytest.mark.integration
def test_the_gate_promotes_a_first_model_and_refuses_a_worse_one(
    trained_model: tuple, tracking_uri: str
) -> None:
    trained = trained_model[0]
    first = register_gate.python_func(
        trained=trained, model_name="gate-m", tracking_uri=tracking_uri
    )
    assert first.promoted and first.model_uri == "models:/gate-m/1"
    assert "gate passed: gate-m v1 is the champion" in first.message
    mc = client(tracking_uri)
    # Make the champion unbeatable; the same run registered again must then be refused.
    mc.set_model_version_tag("gate-m", "1", "primary_metric_value", "1.0")
    second = register_gate.python_func(
        trained=trained, model_name="gate-m", tracking_uri=tracking_uri
    )
    assert not second.promoted
    assert "gate refused v2" in second.message and "nothing is deployed" in second.message
    assert str(mc.get_model_version_by_alias("gate-m", "champion").version) == "1"


@pytest.mark.integration
def test_train_evaluate_and_gate_run_under_kfp_local(kfp_local: Path, tracking_uri: str) -> None:
    from kfp import dsl

    from components.build_features.component import build_features
    from components.conftest import TRAINABLE
    from components.evaluate.component import evaluate
    from components.synth_data.component import synth_data
    from components.train.component import train

    @dsl.pipeline
    def train_and_gate(uri: str) -> str:
        market = synth_data(**TRAINABLE)
        feats = build_features(marketplace=market.outputs["marketplace"], embed_text=False)
        trained = train(
            marketplace=market.outputs["marketplace"],
            features=feats.outputs["features"],
            epochs=1,
            max_len=20,
            nproc=1,
            tracking_uri=uri,
            experiment="components",
        )
        evaluate(
            marketplace=market.outputs["marketplace"],
            features=feats.outputs["features"],
            trained=trained.outputs["trained"],
        )
        gate = register_gate(
            trained=trained.outputs["trained"], model_name="kfp-local-m", tracking_uri=uri
        )
        return gate.outputs["message"]

    run = train_and_gate(uri=tracking_uri)
    assert run.output.startswith("gate passed: kfp-local-m v1")


def test_gate_open_says_the_decision_and_hands_it_on(capsys: pytest.CaptureFixture) -> None:
    from components.register_gate.component import gate_open

    assert gate_open.python_func(promoted=False, message="gate refused v2: worse") is False
    assert "not deploying: gate refused v2: worse" in capsys.readouterr().out
    assert gate_open.python_func(promoted=True, message="gate passed") is True
