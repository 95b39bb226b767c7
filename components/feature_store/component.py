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
    publish_dir: str = "",
) -> str:
    """Applies feature_repo/ and materializes up to the end of the data; returns that time.

    ``store`` holds the registry (and the SQLite online store); with ``online="redis"`` the
    online values go to ``redis``. ``online``, ``redis`` and ``project`` are
    ``candgen.features.store.StoreConfig`` fields. With ``publish_dir`` (on a cluster: the
    folder on the shared claim the feature server reads) the registry is also copied there.
    """
    from pathlib import Path

    from candgen.features.store import StoreConfig, apply, materialize, publish

    config = StoreConfig(
        online=online,
        features_dir=Path(features.path),
        state_dir=Path(store.path),
        redis=redis,
        project=project,
    )
    Path(store.path).mkdir(parents=True, exist_ok=True)
    applied = apply(config)
    end = materialize(config)
    if publish_dir:
        publish(config, Path(publish_dir))
    store.metadata.update(
        {
            "online": online,
            "project": project,
            "materialized_to": end.isoformat(),
            "feature_services": applied.feature_services,
            "published_to": publish_dir,
        }
    )
    return end.isoformat()
