from __future__ import annotations

from pathlib import Path

import pytest
from kfp.dsl import Artifact

from candgen.errors import CandgenError
from candgen.serving.steps import pinned_version, read_serving_file
from components.export_repository.component import export_repository


@pytest.mark.integration
def test_python_func_exports_around_the_upstream_index(
    exported_repo: tuple, registered_uri: str
) -> None:
    index, repo = exported_repo
    version = pinned_version(Path(repo.path))
    assert version == int(registered_uri.rsplit("/", 1)[1]) == repo.metadata["version"]
    copied = Path(repo.path) / "candgen_generators" / str(version) / "ads.faiss"
    assert copied.read_bytes() == (Path(index.path) / "ads.faiss").read_bytes()
    assert repo.metadata["model_uri"] == registered_uri
    # The learned quotas are what its select step serves.
    select = Path(repo.path) / "candgen_select" / str(version)
    assert (select / "quotas.json").exists()
    config, _, provenance = read_serving_file(select)
    # The component's default policy is auto, which serves the table because one is there.
    assert config.quota_policy == "auto" and provenance["quota_policy"] == "learned"
    policy = config.policy(select)
    assert policy.policy == "learned" and policy.learned is not None


@pytest.mark.integration
def test_an_index_of_another_version_is_refused(
    exported_repo: tuple,
    trained_model: tuple,
    tracking_uri: str,
    trainable_data: tuple,
    learned: Artifact,
    tmp_path: Path,
) -> None:
    from candgen.registry.tracking import register

    version = register(trained_model[2], "other-m", "ndcg@10", tracking_uri)["version"]
    other = f"models:/other-m/{version}"
    with pytest.raises(CandgenError, match=r"index_dir: .* was built for models:/components-m/"):
        export_repository.python_func(
            model_uri=other,
            features=trainable_data[1],
            index=exported_repo[0],
            quotas=learned,
            repository=Artifact(uri=str(tmp_path / "r")),
            tracking_uri=tracking_uri,
        )


@pytest.mark.integration
def test_the_learned_policy_without_a_table_is_refused(
    registered_uri: str,
    built_index: Artifact,
    trainable_data: tuple,
    tracking_uri: str,
    tmp_path: Path,
) -> None:
    from candgen.errors import ConfigError

    empty = Artifact(uri=str(tmp_path / "no-quotas"))
    with pytest.raises(CandgenError, match=r"^quotas: .*does not exist"):
        export_repository.python_func(
            model_uri=registered_uri,
            features=trainable_data[1],
            index=built_index,
            quotas=empty,
            repository=Artifact(uri=str(tmp_path / "r")),
            tracking_uri=tracking_uri,
        )
    with pytest.raises(ConfigError, match=r"^quota_policy: 'bandit' is not one of"):
        export_repository.python_func(
            model_uri=registered_uri,
            features=trainable_data[1],
            index=built_index,
            quotas=empty,
            quota_policy="bandit",
            repository=Artifact(uri=str(tmp_path / "r")),
            tracking_uri=tracking_uri,
        )
