"""Finding ids in large id arrays without a Python dict (about 100 bytes an entry: a gigabyte
at 10M ads), by binary search over a sorted copy."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np


def narrow(rows: np.ndarray) -> np.ndarray:
    """Row numbers as int32 where they fit: half the memory (40 MB instead of 80 at 10M)."""
    return rows.astype(np.int32) if len(rows) < 2**31 else rows


class SortedIds:
    """Where each id sits in an id array: binary search over a sorted copy of the ids.

    Searching the array through its argsort (``searchsorted(sorter=...)``) reads two random
    places a step, and numpy copied an int32 sorter to int64 on every call: 1 ms for 400 ids at
    10M (serving_notes.md, 17); over a sorted copy the same search takes 0.02 ms. An array
    already in order is its own sorted copy, and no permutation is held.

    Args:
        ids: (n,) unique ids, in any order.
    """

    def __init__(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        self.sorted: np.ndarray
        self.order: np.ndarray | None  # row of each sorted id; None: the rows are in order
        if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()):
            self.sorted, self.order = ids, None
        else:
            order = np.argsort(ids, kind="stable")
            self.sorted, self.order = ids[order], narrow(order)

    def __len__(self) -> int:
        return len(self.sorted)

    def rows(self, keys: np.ndarray | Sequence[int]) -> np.ndarray:
        """Each key's row, -1 where absent."""
        keys = np.asarray(keys, np.int64)
        if not len(self.sorted):
            return np.full(len(keys), -1, np.int64)
        at = np.minimum(np.searchsorted(self.sorted, keys), len(self.sorted) - 1)
        rows = at if self.order is None else self.order[at]
        found: np.ndarray = np.where(self.sorted[at] == keys, rows, -1).astype(np.int64)
        return found

    def appended(self, ids: np.ndarray) -> SortedIds:
        """A copy with ``ids`` (none already here) as the next rows, merged in: O(n) copies
        instead of sorting all again (a second at 10M)."""
        ids = np.asarray(ids, np.int64)
        n = len(self.sorted)
        new_order = np.argsort(ids, kind="stable")
        at = np.searchsorted(self.sorted, ids[new_order])
        out = SortedIds.__new__(SortedIds)
        out.sorted = np.insert(self.sorted, at, ids[new_order])
        in_order = (at == n).all() and (new_order == np.arange(len(ids))).all()
        if self.order is None and in_order:
            out.order = None
        else:
            old = narrow(np.arange(n)) if self.order is None else self.order
            if n + len(ids) >= 2**31:
                old = old.astype(np.int64)
            out.order = np.insert(old, at, n + new_order)  # in old's dtype: no int64 copy
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
        self._find = SortedIds(self.ids)

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """The row of each key, -1 where absent (or only in a skipped first row): one call for
        a whole history (a binary search per id is 100 times a dict's lookup)."""
        found = self._find.rows(keys)
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
