"""Finding ids in large id arrays (``candgen.data.ids``)."""

from __future__ import annotations

import numpy as np
import pytest

from candgen.data.ids import SortedIds


@pytest.mark.parametrize("in_order", [True, False])
def test_sorted_ids_find_each_row_as_a_dict_would_and_stay_right_after_appends(
    in_order: bool,
) -> None:
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(10_000, 500, replace=False)) * 7 + 3
    if not in_order:
        ids = rng.permutation(ids)
    found = SortedIds(ids)
    assert (found.order is None) == in_order  # an array in order holds no permutation
    keys = rng.integers(0, 70_010, 2_000)
    row_of = {int(a): i for i, a in enumerate(ids.tolist())}
    assert found.rows(keys).tolist() == [row_of.get(int(k), -1) for k in keys]
    # appended ids become the next rows, whether they keep the array in order or not
    for extra in (np.array([80_001, 80_008]), np.array([5, 80_100, 4])):
        found = found.appended(extra)
        ids = np.concatenate([ids, extra])
        row_of = {int(a): i for i, a in enumerate(ids.tolist())}
        keys = np.concatenate([keys, extra, extra + 1])
        assert found.rows(keys).tolist() == [row_of.get(int(k), -1) for k in keys]
    assert found.order is not None  # 5 and 4 broke the order
    assert SortedIds(np.zeros(0, np.int64)).rows([1, 2]).tolist() == [-1, -1]
