"""Point-in-time training sets: label rows from the event log joined to features with Feast's
``get_historical_features``, which takes for each row the newest feature value stamped at or
before the row's timestamp (and within the view's ttl), never a later one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pandas as pd

from candgen.errors import CandgenError, ConfigError

if TYPE_CHECKING:  # Feast is imported by whoever opens the store
    from feast import FeatureStore

LABEL_KINDS: Final = ("click", "conversion")


def label_rows(data_dir: Path | str, label: str = "click") -> pd.DataFrame:
    """One row per ad impression with a 0/1 label, stamped at the impression.

    Args:
        data_dir: a marketplace written by ``candgen data synth``.
        label: ``click`` (the impression was clicked) or ``conversion`` (an attributed
            conversion followed its click).

    Returns:
        Columns user_id, ad_id, surface, event_timestamp, label.
    """
    if label not in LABEL_KINDS:
        raise ConfigError("label", f"must be one of {LABEL_KINDS}, got {label!r}")
    events = pd.read_parquet(
        Path(data_dir) / "events",
        columns=[
            "event_id",
            "user_id",
            "ad_id",
            "surface",
            "event_ts",
            "event_type",
            "caused_by_event_id",
        ],
    )
    imps = events[events["event_type"] == "impression"]
    clicks = events[events["event_type"] == "click"]
    positive_imps = set(clicks["caused_by_event_id"].astype(np.int64))
    if label == "conversion":
        convs = events[events["event_type"] == "conversion"]
        converted_clicks = set(convs["caused_by_event_id"].astype(np.int64))
        click_to_imp = dict(
            zip(clicks["event_id"], clicks["caused_by_event_id"].astype(np.int64), strict=True)
        )
        positive_imps = {click_to_imp[c] for c in converted_clicks}
    out = pd.DataFrame(
        {
            "user_id": imps["user_id"].to_numpy(np.int64),
            "ad_id": imps["ad_id"].to_numpy(np.int64),
            "surface": imps["surface"].to_numpy(),
            "event_timestamp": imps["event_ts"].to_numpy(),
            "label": imps["event_id"].isin(positive_imps).to_numpy(np.int8),
        }
    )
    return out.reset_index(drop=True)


def training_set(
    store: FeatureStore, entity_df: pd.DataFrame, service: str = "training_v1"
) -> pd.DataFrame:
    """Joins features onto label rows, point in time.

    Args:
        store: a Feast FeatureStore with the definitions applied.
        entity_df: rows with the service's join keys (user_id, ad_id) and ``event_timestamp``.
        service: the versioned feature service to join.

    Returns:
        ``entity_df``'s rows with one column per feature.
    """
    required = {"event_timestamp"}
    missing = required - set(entity_df.columns)
    if missing:
        raise CandgenError(f"entity_df: missing column(s) {sorted(missing)}")
    if len(entity_df) == 0:
        raise CandgenError("entity_df: no rows to build a training set from")
    return store.get_historical_features(
        entity_df=entity_df, features=store.get_feature_service(service)
    ).to_df()


def write_training_set(
    data_dir: Path | str,
    store: FeatureStore,
    out: Path | str,
    label: str = "click",
    service: str = "training_v1",
    limit: int = 0,
) -> dict[str, Any]:
    """Label rows of a marketplace joined point in time, written to ``out`` (parquet).

    Args:
        limit: a seeded sample of this many label rows (0: all of them).

    Returns:
        ``{"out", "rows", "positive_rate"}``.
    """
    if limit < 0:
        raise ConfigError("limit", f"must be >= 0, got {limit}")
    rows = label_rows(data_dir, label)
    if limit:
        rows = rows.sample(min(limit, len(rows)), random_state=0).sort_index()
    df = training_set(store, rows, service)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out, index=False)
    return {"out": str(out), "rows": len(df), "positive_rate": float(df["label"].mean())}
