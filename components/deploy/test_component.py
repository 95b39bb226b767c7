# No `from __future__ import annotations`: KFP reads the pipeline's annotations as types.
from pathlib import Path

import pytest

from candgen.endpoint.client import RetrieveClient
from candgen.endpoint.runtime import ServerConfig, start, stop
from candgen.errors import CandgenError
from candgen.images import PLATFORM_IMAGE
from candgen.serving.steps import pinned_version
from components.build_index.component import build_index
from components.deploy.component import deploy
from components.export_repository.component import export_repository
from components.learn_quotas.component import learn_quotas
from tests.net import free_ports


@pytest.mark.integration
def test_index_export_and_deploy_switch_a_running_triton_under_kfp_local(
    kfp_local: Path,
    registered_uri: str,
    tracking_uri: str,
    trainable_data: tuple,
    trained_model: tuple,
    tmp_path: Path,
) -> None:
    from kfp import dsl
    from kfp.dsl import Dataset, Model

    market_path, features_path = trainable_data[0].path, trainable_data[1].path
    target = tmp_path / "served"
    target.mkdir()
    http, grpc, metrics, feature_port = free_ports(4)
    server = ServerConfig(
        model_repository=str(target),
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        state_dir=str(tmp_path / "triton"),
        ready_timeout_s=120,
    )

    # kfp.local feeds a step only artifacts of upstream steps: these two bring the fixtures'.
    @dsl.component(base_image=PLATFORM_IMAGE)
    def as_dataset(data: dsl.Output[Dataset], source: str) -> None:
        import shutil

        shutil.copytree(source, data.path)

    @dsl.component(base_image=PLATFORM_IMAGE)
    def as_model(model: dsl.Output[Model], source: str) -> None:
        import shutil

        shutil.copytree(source, model.path)

    @dsl.pipeline
    def ship(
        uri: str,
        model_uri: str,
        market: str,
        source: str,
        trained: str,
        target_repository: str,
        url: str,
    ) -> str:
        feats = as_dataset(source=source).outputs["data"]
        index = build_index(model_uri=model_uri, tracking_uri=uri)
        model = as_model(source=trained).outputs["model"]
        quotas = learn_quotas(
            trained=model,
            marketplace=as_dataset(source=market).outputs["data"],
            features=feats,
            index=index.outputs["index"],
            max_rank=100,
        )
        repo = export_repository(
            model_uri=model_uri,
            features=feats,
            index=index.outputs["index"],
            quotas=quotas.outputs["quotas"],
            tracking_uri=uri,
            feature_server_url=f"http://127.0.0.1:{feature_port}",
        )
        return deploy(
            repository=repo.outputs["repository"],
            target_repository=target_repository,
            triton_url=url,
        ).output

    start(server)  # an empty repository: nothing is served yet
    try:
        run = ship(
            uri=tracking_uri,
            model_uri=registered_uri,
            market=market_path,
            source=features_path,
            trained=trained_model[0].path,
            target_repository=str(target),
            url=f"127.0.0.1:{grpc}",  # the deploy step asks for loads over gRPC by default
        )
        version = pinned_version(target)
        assert run.output == f"v{version} installed in {target} and serving at 127.0.0.1:{grpc}"
        res = RetrieveClient(f"127.0.0.1:{http}").retrieve(1, "home", 10)
        assert len(res.ad_ids) == 10 and res.fallback  # no feature server in this test
        assert res.quota_policy == "learned" and sum(res.source_counts.values()) == 10
    finally:
        stop(server)


@pytest.mark.integration
def test_without_a_server_it_installs_the_version_beside_the_old_ones(
    exported_repo: tuple, tmp_path: Path
) -> None:

    repo = exported_repo[1]
    version = pinned_version(Path(repo.path))
    old = tmp_path / "t" / "candgen_select" / "0"  # an older version already served
    old.mkdir(parents=True)
    said = deploy.python_func(repository=repo, target_repository=str(tmp_path / "t"))
    assert said == f"v{version} installed in {tmp_path / 't'}; no server to switch (triton_url)"
    assert pinned_version(tmp_path / "t") == version and old.exists()


def test_an_empty_export_is_a_clear_error(tmp_path: Path) -> None:
    from kfp.dsl import Artifact

    (tmp_path / "exported" / "retrieve").mkdir(parents=True)
    with pytest.raises(CandgenError, match="holds no exported candgen version"):
        deploy.python_func(
            repository=Artifact(uri=str(tmp_path / "exported")),
            target_repository=str(tmp_path / "t"),
        )
