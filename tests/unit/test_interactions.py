import numpy as np
import pandas as pd
import pytest

from candgen.data.interactions import leave_one_out, summarize, validate_interactions
from candgen.errors import CandgenError


def table(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    u, i, p = zip(*rows, strict=True)
    return pd.DataFrame(
        {
            "user_id": np.array(u, np.int64),
            "item_id": np.array(i, np.int64),
            "position": np.array(p, np.int32),
            "timestamp": pd.NaT,
            "label": "organic",
        }
    )


def test_leave_one_out_by_hand() -> None:
    # user 1: items 10, 11, 12, 13 (given out of order); user 2: only 2 items (not evaluated)
    df = table([(1, 12, 2), (1, 10, 0), (2, 5, 0), (1, 13, 3), (1, 11, 1), (2, 6, 1)])
    split = leave_one_out(df)
    assert split.test[["user_id", "item_id"]].values.tolist() == [[1, 13]]
    assert split.valid[["user_id", "item_id"]].values.tolist() == [[1, 12]]
    assert sorted(split.train["item_id"]) == [5, 6, 10, 11]
    assert split.train_sequences()[1].tolist() == [10, 11]
    assert split.test_histories()[1].tolist() == [10, 11, 12]


def test_summarize_counts() -> None:
    df = table([(1, 1, 0), (1, 2, 1), (2, 1, 0)])
    assert summarize(df) == {"users": 2, "items": 2, "interactions": 3}


def test_empty_dataset_is_rejected() -> None:
    with pytest.raises(CandgenError, match="empty"):
        validate_interactions(table([(1, 1, 0)]).iloc[:0])


def test_unknown_label_is_rejected() -> None:
    df = table([(1, 1, 0)]).assign(label="purchase")
    with pytest.raises(CandgenError, match="label"):
        validate_interactions(df)
