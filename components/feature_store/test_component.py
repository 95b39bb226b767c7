# No `from __future__ import annotations`: KFP reads the pipeline's annotations as types.
from pathlib import Path

import pytest
from kfp.dsl import Artifact, Dataset

from candgen.errors import ConfigError
from candgen.features.store import StoreConfig, online_features, open_store
from components.build_features.component import build_features
from components.conftest import SMALL
from components.feature_store.component import feature_store
from components.synth_data.component import synth_data


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = tmp_path_factory.mktemp("fs")
    market, out = Dataset(uri=str(root / "m")), Dataset(uri=str(root / "f"))
    synth_data.python_func(marketplace=market, **SMALL)
    build_features.python_func(marketplace=market, features=out, embed_text=False)
    return out


@pytest.mark.integration
def test_python_func_applies_and_materializes(features: Dataset, tmp_path: Path) -> None:
    store = Artifact(uri=str(tmp_path / "store"))
    end = feature_store.python_func(features=features, store=store)
    assert store.metadata["materialized_to"] == end
    assert "user_serving_v1" in store.metadata["feature_services"]
    cfg = StoreConfig(features_dir=Path(features.path), state_dir=Path(store.path))
    row = online_features(open_store(cfg), [{"user_id": 1}])
    assert row["recent_item_ids"][0]  # user 1 has a short-term sequence online


def test_a_bad_parameter_names_the_field(features: Dataset, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^online:"):
        feature_store.python_func(
            features=features, store=Artifact(uri=str(tmp_path / "s")), online="cassandra"
        )


@pytest.mark.integration
def test_runs_under_kfp_local_with_redis(kfp_local: Path) -> None:
    from kfp import dsl

    @dsl.pipeline
    def three_steps() -> str:
        market = synth_data(**SMALL)
        feats = build_features(marketplace=market.outputs["marketplace"], embed_text=False)
        store = feature_store(
            features=feats.outputs["features"], online="redis", project="candgen_kfp_test"
        )
        return store.outputs["Output"]

    run = three_steps()
    assert run.output.startswith("20")  # the ISO time the online store was materialized to


@pytest.mark.integration
def test_the_registry_is_published_where_a_feature_server_reads_it(
    features: Dataset, tmp_path: Path
) -> None:
    store = Artifact(uri=str(tmp_path / "store"))
    published = tmp_path / "claim" / "feature_store"
    feature_store.python_func(features=features, store=store, publish_dir=str(published))
    assert sorted(p.name for p in published.iterdir()) == ["online_store.db", "registry.db"]
    assert store.metadata["published_to"] == str(published)
    # a store opened on the published copy answers like the original
    copy = StoreConfig(features_dir=Path(features.path), state_dir=published)
    row = online_features(open_store(copy), [{"user_id": 1}])
    assert row["recent_item_ids"][0]
