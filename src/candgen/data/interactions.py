"""The common interaction table that every data set is turned into, and leave-one-out splits.

Columns (see ``INTERACTION_SCHEMA``):
    user_id (int64), item_id (int64), position (int32, 0-based order within the user's history),
    timestamp (timestamp[us, UTC] or null when the source has only an order), label (string:
    ``organic``, ``click`` or ``conversion``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import pandas as pd
import pyarrow as pa

from candgen.errors import CandgenError
from candgen.vocab import LABELS

INTERACTION_SCHEMA: Final = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("position", pa.int32()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("label", pa.string()),
    ]
)


def validate_interactions(df: pd.DataFrame, name: str = "interactions") -> pd.DataFrame:
    """Checks that ``df`` has the common columns with sane values.

    Args:
        df: a candidate interaction table.
        name: how to refer to it in error messages.

    Returns:
        ``df`` unchanged.

    Raises:
        CandgenError: a column is missing, empty, or holds an unknown label.
    """
    missing = [f.name for f in INTERACTION_SCHEMA if f.name not in df.columns]
    if missing:
        raise CandgenError(f"{name}: missing column(s) {missing}")
    if len(df) == 0:
        raise CandgenError(f"{name}: the dataset is empty (no interactions)")
    bad = set(df["label"].unique()) - set(LABELS)
    if bad:
        raise CandgenError(f"{name}.label: unknown label(s) {sorted(bad)}; expected {LABELS}")
    return df


@dataclass(frozen=True)
class LeaveOneOutSplit:
    """Per-user leave-one-out split: last item = test, second-to-last = validation.

    Attributes:
        train: every interaction but each user's last two (ordered by user, position).
        valid: one row per user, the second-to-last interaction.
        test: one row per user, the last interaction.
    """

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame

    def train_sequences(self) -> dict[int, np.ndarray]:
        """Returns each user's training items in order, keyed by user id.

        These are also the histories that precede each validation item.
        """
        return _sequences(self.train)

    def test_histories(self) -> dict[int, np.ndarray]:
        """Returns each user's items before the test item (train + validation)."""
        return _sequences(pd.concat([self.train, self.valid], ignore_index=True))


def _sequences(df: pd.DataFrame) -> dict[int, np.ndarray]:
    ordered = df.sort_values(["user_id", "position"], kind="stable")
    users = ordered["user_id"].to_numpy()
    items = ordered["item_id"].to_numpy()
    bounds = np.flatnonzero(np.diff(users)) + 1
    return {
        int(chunk_users[0]): chunk_items
        for chunk_users, chunk_items in zip(
            np.split(users, bounds), np.split(items, bounds), strict=True
        )
        if len(chunk_users)
    }


def leave_one_out(df: pd.DataFrame, min_interactions: int = 3) -> LeaveOneOutSplit:
    """Splits an interaction table by the leave-one-out protocol.

    Each user's interactions are ordered by ``position``; the last one is the test item, the
    second-to-last the validation item, the rest are training. Users with fewer than
    ``min_interactions`` interactions keep all of them in training and get no test row (the
    protocol needs at least one training item before the validation item).

    Args:
        df: a table in the common schema.
        min_interactions: the fewest interactions a user needs to be evaluated.

    Returns:
        The three parts.
    """
    validate_interactions(df)
    ordered = df.sort_values(["user_id", "position"], kind="stable").reset_index(drop=True)
    counts = ordered.groupby("user_id", sort=False)["item_id"].transform("size").to_numpy()
    rank_from_end = ordered.groupby("user_id", sort=False).cumcount(ascending=False).to_numpy()
    eligible = counts >= min_interactions
    is_test = eligible & (rank_from_end == 0)
    is_valid = eligible & (rank_from_end == 1)
    is_train = ~(is_test | is_valid)
    return LeaveOneOutSplit(
        train=ordered[is_train].reset_index(drop=True),
        valid=ordered[is_valid].reset_index(drop=True),
        test=ordered[is_test].reset_index(drop=True),
    )


def summarize(df: pd.DataFrame) -> dict[str, int]:
    """Counts users, items and interactions in a table in the common schema."""
    return {
        "users": int(df["user_id"].nunique()),
        "items": int(df["item_id"].nunique()),
        "interactions": len(df),
    }
