"""Build the point-in-time training set: ad impressions labelled and joined to features."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from candgen.images import PLATFORM_IMAGE


@dsl.component(base_image=PLATFORM_IMAGE)
def training_set(
    marketplace: Input[Dataset],
    features: Input[Dataset],
    store: Input[Artifact],
    rows: Output[Dataset],
    label: str = "click",
    service: str = "training_v1",
    limit: int = 0,
    online: str = "sqlite",
    redis: str = "127.0.0.1:6379",
    project: str = "candgen",
) -> int:
    """Writes ``rows/training_set.parquet`` (Feast ``get_historical_features`` over the feature
    service ``service``); returns the row count.

    ``label`` is ``click`` or ``conversion``; ``limit`` samples that many impressions (0: all).
    ``online``, ``redis`` and ``project`` are ``StoreConfig`` fields, as in ``feature_store``.
    """
    from pathlib import Path

    from candgen.features.store import StoreConfig, open_store
    from candgen.features.training_set import write_training_set

    config = StoreConfig(
        online=online,
        features_dir=Path(features.path),
        state_dir=Path(store.path),
        redis=redis,
        project=project,
    )
    out = write_training_set(
        marketplace.path,
        open_store(config),
        Path(rows.path) / "training_set.parquet",
        label,
        service,
        limit,
    )
    rows.metadata.update(
        {
            "label": label,
            "service": service,
            "rows": out["rows"],
            "positive_rate": out["positive_rate"],
        }
    )
    return int(out["rows"])
