"""The loaders on the real files in ../shared/data, with the counts its README gives."""

from pathlib import Path

import pytest

from candgen.data.amazon import (
    load_action_lines,
    load_beauty,
    load_beauty_attributes,
    load_games,
    load_user_lines,
)
from candgen.data.interactions import leave_one_out, summarize
from candgen.errors import DataFormatError
from candgen.paths import shared_data_dir


def test_beauty_counts_and_split() -> None:
    df = load_beauty()
    assert summarize(df) == {"users": 22_363, "items": 12_101, "interactions": 198_502}
    split = leave_one_out(df)
    # Every Beauty user has at least 5 items, so each has one test and one validation item.
    assert len(split.test) == len(split.valid) == 22_363
    assert len(split.train) == 198_502 - 2 * 22_363
    # The test item is the last item on the user's line.
    first_line = (shared_data_dir() / "amazon-beauty" / "Beauty.txt").read_text().split("\n")[0]
    user, *items = map(int, first_line.split())
    test_row = split.test[split.test["user_id"] == user]
    assert test_row["item_id"].item() == items[-1]
    assert split.valid[split.valid["user_id"] == user]["item_id"].item() == items[-2]


def test_beauty_attributes_cover_every_item() -> None:
    attrs = load_beauty_attributes()
    assert len(attrs) == 12_101
    assert set(load_beauty()["item_id"].unique()) <= set(attrs)


def test_games_counts_and_split() -> None:
    df = load_games()
    assert summarize(df) == {"users": 31_013, "items": 23_715, "interactions": 287_107}
    split = leave_one_out(df)
    evaluated = (df.groupby("user_id").size() >= 3).sum()
    assert len(split.test) == len(split.valid) == evaluated
    assert len(split.train) + len(split.valid) + len(split.test) == 287_107


def test_malformed_user_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "Beauty.txt"
    path.write_text("1 10 11 12\n2 13 x14 15\n")
    with pytest.raises(DataFormatError, match=r"Beauty\.txt:2: expected integer ids, got 'x14'"):
        load_user_lines(path)


def test_user_line_without_items_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "Beauty.txt"
    path.write_text("1 10 11\n2\n")
    with pytest.raises(DataFormatError, match=r":2: a user line needs at least one item"):
        load_user_lines(path)


def test_repeated_user_line_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "Beauty.txt"
    path.write_text("1 10 11\n1 12\n")
    with pytest.raises(DataFormatError, match=r":2: user 1 appears on two lines"):
        load_user_lines(path)


def test_malformed_action_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "Video.txt"
    path.write_text("1 10\n1 11\n2 12 13\n")
    with pytest.raises(DataFormatError, match=r"Video\.txt:3: expected 'user item', got 3"):
        load_action_lines(path)


def test_action_lines_keep_file_order_as_position(tmp_path: Path) -> None:
    path = tmp_path / "Video.txt"
    path.write_text("1 10\n2 20\n1 11\n1 12\n2 21\n")
    df = load_action_lines(path)
    assert df[df.user_id == 1].sort_values("position")["item_id"].tolist() == [10, 11, 12]
    assert df[df.user_id == 2].sort_values("position")["item_id"].tolist() == [20, 21]
