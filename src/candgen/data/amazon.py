"""Loaders for the real Amazon review sets in ../shared/data (see its README.md).

Both produce the common interaction table (:mod:`candgen.data.interactions`) with label
``organic`` and no timestamps: the files give only the order of each user's actions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from candgen.data.interactions import validate_interactions
from candgen.errors import DataFormatError
from candgen.paths import shared_data_dir

BEAUTY_FILE = Path("amazon-beauty") / "Beauty.txt"
BEAUTY_ATTRIBUTES_FILE = Path("amazon-beauty") / "Beauty_item2attributes.json"
GAMES_FILE = Path("amazon-games") / "Video.txt"


def _parse_ints(path: Path, line_no: int, tokens: list[str]) -> list[int]:
    try:
        values = [int(tok) for tok in tokens]
    except ValueError:
        bad = next(tok for tok in tokens if not tok.lstrip("-").isdigit())
        raise DataFormatError(str(path), line_no, f"expected integer ids, got {bad!r}") from None
    if any(v < 0 for v in values):
        raise DataFormatError(str(path), line_no, "ids must be non-negative")
    return values


def _table(users: list[int], items: list[int], positions: list[int]) -> pd.DataFrame:
    n = len(users)
    return pd.DataFrame(
        {
            "user_id": np.asarray(users, dtype=np.int64),
            "item_id": np.asarray(items, dtype=np.int64),
            "position": np.asarray(positions, dtype=np.int32),
            "timestamp": pd.Series(pd.NaT, index=range(n), dtype="datetime64[us, UTC]"),
            "label": pd.Series(["organic"] * n, dtype="string"),
        }
    )


def load_user_lines(path: Path) -> pd.DataFrame:
    """Reads a file with one line per user: ``user item1 item2 ...`` in time order.

    Args:
        path: the file (Beauty.txt's format).

    Returns:
        The common interaction table.

    Raises:
        DataFormatError: a line is empty of items, holds a non-integer, or repeats a user.
    """
    users: list[int] = []
    items: list[int] = []
    positions: list[int] = []
    seen: set[int] = set()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                raise DataFormatError(str(path), line_no, "empty line")
            values = _parse_ints(path, line_no, tokens)
            if len(values) < 2:
                raise DataFormatError(str(path), line_no, "a user line needs at least one item")
            user = values[0]
            if user in seen:
                raise DataFormatError(str(path), line_no, f"user {user} appears on two lines")
            seen.add(user)
            seq = values[1:]
            users.extend([user] * len(seq))
            items.extend(seq)
            positions.extend(range(len(seq)))
    return validate_interactions(_table(users, items, positions), str(path))


def load_action_lines(path: Path) -> pd.DataFrame:
    """Reads a file with one action per line: ``user item``, each user's lines in time order.

    Args:
        path: the file (Video.txt's format).

    Returns:
        The common interaction table; ``position`` counts each user's lines in file order.

    Raises:
        DataFormatError: a line does not hold exactly two integers.
    """
    users: list[int] = []
    items: list[int] = []
    positions: list[int] = []
    next_position: dict[int, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            tokens = line.split()
            if len(tokens) != 2:
                raise DataFormatError(
                    str(path), line_no, f"expected 'user item', got {len(tokens)} field(s)"
                )
            user, item = _parse_ints(path, line_no, tokens)
            pos = next_position.get(user, 0)
            next_position[user] = pos + 1
            users.append(user)
            items.append(item)
            positions.append(pos)
    return validate_interactions(_table(users, items, positions), str(path))


def load_beauty(data_dir: Path | None = None) -> pd.DataFrame:
    """Amazon Beauty (S3-Rec preprocessing): 22,363 users, 12,101 items, 198,502 interactions."""
    return load_user_lines((data_dir or shared_data_dir()) / BEAUTY_FILE)


def load_beauty_attributes(data_dir: Path | None = None) -> dict[int, list[int]]:
    """Beauty's item attributes (brand and category ids), keyed by item id."""
    return load_item_attributes((data_dir or shared_data_dir()) / BEAUTY_ATTRIBUTES_FILE)


def attributes_beside(path: Path) -> Path:
    """Where a sequence file's item attributes are kept: ``<name>_item2attributes.json``
    beside ``<name>.txt`` (as Beauty's are)."""
    return path.with_name(f"{path.stem}_item2attributes.json")


def load_item_attributes(path: Path) -> dict[int, list[int]]:
    """A ``{item_id: [attribute ids]}`` JSON file, keyed by item id.

    Raises:
        DataFormatError: the file is not that JSON object.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(str(path), e.lineno, f"invalid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise DataFormatError(str(path), None, "expected a JSON object {item_id: [attribute ids]}")
    try:
        return {int(k): [int(a) for a in v] for k, v in raw.items()}
    except (TypeError, ValueError):
        raise DataFormatError(
            str(path), None, "expected integer item ids, each with a list of integer attributes"
        ) from None


def load_games(data_dir: Path | None = None) -> pd.DataFrame:
    """Amazon Games (SASRec paper): 31,013 users, 23,715 items, 287,107 interactions."""
    return load_action_lines((data_dir or shared_data_dir()) / GAMES_FILE)


DATASETS = {"beauty": load_beauty, "games": load_games}
