"""kfp.local for the component tests: components run as subprocesses of this environment."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def kfp_local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kfp import local

    root = tmp_path_factory.mktemp("pipeline_root")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    return root


SMALL = {"users": 60, "ads": 80, "items": 60, "days": 4, "seed": 3}

# Enough users with clicks in the held-out days for training and evaluation.
TRAINABLE = {"users": 150, "ads": 200, "items": 150, "days": 6, "seed": 5}


@pytest.fixture(scope="session")
def trainable_data(tmp_path_factory: pytest.TempPathFactory):  # -> (marketplace, features)
    from kfp.dsl import Dataset

    from components.build_features.component import build_features
    from components.synth_data.component import synth_data

    root = tmp_path_factory.mktemp("trainable")
    market, features = Dataset(uri=str(root / "m")), Dataset(uri=str(root / "f"))
    synth_data.python_func(marketplace=market, **TRAINABLE)
    build_features.python_func(marketplace=market, features=features, embed_text=False)
    return market, features


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    from candgen.registry.tracking import client

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client(uri).create_experiment("components", artifact_location=(root / "art").as_uri())
    return uri


@pytest.fixture(scope="session")
def trained_model(trainable_data, tracking_uri: str, tmp_path_factory):  # type: ignore[no-untyped-def]
    from kfp.dsl import Metrics, Model

    from components.train.component import train

    market, features = trainable_data
    root = tmp_path_factory.mktemp("trained")
    trained, metrics = Model(uri=str(root / "model")), Metrics(uri=str(root / "metrics"))
    run_id = train.python_func(
        marketplace=market,
        features=features,
        trained=trained,
        metrics=metrics,
        epochs=2,
        max_len=20,
        batch_size=64,
        nproc=1,
        tracking_uri=tracking_uri,
        experiment="components",
    )
    return trained, metrics, run_id


@pytest.fixture(scope="session")
def registered_uri(trained_model, tracking_uri: str) -> str:  # type: ignore[no-untyped-def]
    from candgen.registry.tracking import register

    out = register(trained_model[2], "components-m", "ndcg@10", tracking_uri)
    return f"models:/components-m/{out['version']}"


@pytest.fixture(scope="session")
def built_index(registered_uri: str, tracking_uri: str, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The index artifact of the registered version, by the build_index component."""
    from kfp.dsl import Artifact, Metrics

    from components.build_index.component import build_index

    root = tmp_path_factory.mktemp("index")
    index = Artifact(uri=str(root / "index"))
    build_index.python_func(
        model_uri=registered_uri,
        index=index,
        metrics=Metrics(uri=str(root / "m")),
        tracking_uri=tracking_uri,
    )
    return index


@pytest.fixture(scope="session")
def learned(trained_model, trainable_data, built_index, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The quotas artifact learned for the trained model, by the learn_quotas component."""
    from kfp.dsl import Artifact

    from components.learn_quotas.component import learn_quotas

    market, features = trainable_data
    quotas = Artifact(uri=str(tmp_path_factory.mktemp("quotas") / "quotas"))
    learn_quotas.python_func(
        trained=trained_model[0],
        marketplace=market,
        features=features,
        index=built_index,
        quotas=quotas,
        max_rank=200,
    )
    return quotas


@pytest.fixture(scope="session")
def exported_repo(
    registered_uri: str,
    tracking_uri: str,
    trainable_data,
    built_index,
    learned,  # type: ignore[no-untyped-def]
    tmp_path_factory,
):
    """(index artifact, repository artifact) of the registered version, by the components."""
    from kfp.dsl import Artifact

    from components.export_repository.component import export_repository

    repo = Artifact(uri=str(tmp_path_factory.mktemp("exported") / "repo"))
    export_repository.python_func(
        model_uri=registered_uri,
        features=trainable_data[1],
        index=built_index,
        quotas=learned,
        repository=repo,
        tracking_uri=tracking_uri,
    )
    return built_index, repo
