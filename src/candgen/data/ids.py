"""Finding ids in large id arrays without a Python dict (about 100 bytes an entry: a gigabyte
at 10M ads), by binary search over an argsort."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np


def position_of(positions: np.ndarray, order: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Each id's index in ``positions``, -1 if absent (``order``: ``positions``' argsort)."""
    ids = np.asarray(ids, np.int64)
    if not len(order):
        return np.full(len(ids), -1, np.int64)
    at = order[np.minimum(np.searchsorted(positions, ids, sorter=order), len(order) - 1)]
    out: np.ndarray = np.where(positions[at] == ids, at, -1).astype(np.int64)
    return out


class IdIndex(Mapping[int, int]):
    """id -> its row in an id array (a read-only mapping), by binary search.

    Args:
        ids: the id of each row.
        skip_first: leave row 0 out (a model's padding row).
    """

    def __init__(self, ids: np.ndarray, skip_first: bool = False) -> None:
        self.ids = np.asarray(ids, np.int64)
        self.first = 1 if skip_first else 0
        self.order = np.argsort(self.ids, kind="stable")

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """The row of each key, -1 where absent (or only in a skipped first row): one call for
        a whole history (a binary search per id is 100 times a dict's lookup)."""
        found = position_of(self.ids, self.order, np.asarray(keys, np.int64))
        found[found < self.first] = -1
        return found

    def row(self, key: int) -> int:
        """The row of ``key``, -1 if absent."""
        return int(self.rows(np.asarray([key]))[0])

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int | np.integer) and self.row(int(key)) >= 0

    def __getitem__(self, key: int) -> int:
        row = self.row(int(key))
        if row < 0:
            raise KeyError(key)
        return row

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids[self.first :].tolist())

    def __len__(self) -> int:
        return len(self.ids) - self.first
