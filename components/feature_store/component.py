"""Register the Feast repository (apply) and materialize the online store."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from candgen.images import PLATFORM_IMAGE


@dsl.component(base_image=PLATFORM_IMAGE)
def feature_store(
    features: Input[Dataset],
    store: Output[Artifact],
    online: str = "sqlite",
    redis: str = "127.0.0.1:6379",
    project: str = "candgen",
) -> str:
    """Applies feature_repo/ and materializes up to the end of the data; returns that time.

    ``store`` holds the registry (and the SQLite online store); with ``online="redis"`` the
    online values go to ``redis``. Parameters are ``candgen.features.store.StoreConfig`` fields.
    """
    from pathlib import Path

    from candgen.features.store import StoreConfig, apply, materialize

    config = StoreConfig(online=online, features_dir=Path(features.path),
                         state_dir=Path(store.path), redis=redis, project=project)  # fmt: skip
    Path(store.path).mkdir(parents=True, exist_ok=True)
    applied = apply(config)
    end = materialize(config)
    store.metadata.update({
        "online": online, "project": project, "materialized_to": end.isoformat(),
        "feature_services": applied.feature_services,
    })  # fmt: skip
    return end.isoformat()
