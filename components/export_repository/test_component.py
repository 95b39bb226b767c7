from __future__ import annotations

from pathlib import Path

import pytest
from kfp.dsl import Artifact

from candgen.errors import CandgenError
from candgen.serving.steps import pinned_version
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


@pytest.mark.integration
def test_an_index_of_another_version_is_refused(
    exported_repo: tuple,
    trained_model: tuple,
    tracking_uri: str,
    trainable_data: tuple,
    tmp_path: Path,
) -> None:
    from candgen.registry.tracking import register

    version = register(trained_model[2], "other-m", "ndcg@10", tracking_uri)["version"]
    other = f"models:/other-m/{version}"
    with pytest.raises(CandgenError, match=r"index_dir: .* was built for models:/components-m/"):
        export_repository.python_func(model_uri=other, features=trainable_data[1],
                                      index=exported_repo[0],
                                      repository=Artifact(uri=str(tmp_path / "r")),
                                      tracking_uri=tracking_uri)  # fmt: skip
