"""Any file in Beauty.txt's format as a data set (``--dataset sequences``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from candgen.cli import main
from candgen.data.config import DataConfig
from candgen.data.sequences import load_data, load_planted, planted_interactions
from candgen.errors import ConfigError, DataFormatError


def _write_planted(folder: Path, name: str = "Planted") -> Path:
    """The planted set as a Beauty.txt-style file, with its attributes beside it."""
    df, attrs = planted_interactions(seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        " ".join(map(str, [user, *rows.sort_values("position")["item_id"].tolist()]))
        for user, rows in df.groupby("user_id", sort=True)
    ]
    path = folder / f"{name}.txt"
    path.write_text("\n".join(lines) + "\n")
    (folder / f"{name}_item2attributes.json").write_text(
        json.dumps({str(k): v for k, v in attrs.items()})
    )
    return path


def test_a_sequence_file_is_split_as_the_same_interactions_are(tmp_path: Path) -> None:
    path = _write_planted(tmp_path / "set")
    from_file = load_data(DataConfig(dataset="sequences", data_dir=str(path)))
    planted = load_planted(seed=0)
    assert from_file.name == "Planted"
    assert from_file.num_items == planted.num_items
    assert np.array_equal(from_file.user_ids, planted.user_ids)
    assert np.array_equal(from_file.test.target_item, planted.test.target_item)
    assert np.array_equal(from_file.valid.target_item, planted.valid.target_item)
    assert from_file.item_attributes is not None and planted.item_attributes is not None
    assert np.array_equal(from_file.item_attributes, planted.item_attributes)
    # a folder holding the one file reads the same set; without attributes, none are read
    (tmp_path / "set" / "Planted_item2attributes.json").unlink()
    folder = load_data(DataConfig(dataset="sequences", data_dir=str(tmp_path / "set")))
    assert np.array_equal(folder.test.target_item, planted.test.target_item)
    assert folder.item_attributes is None or not folder.item_attributes[:, 0].any()


def test_a_bad_sequence_set_names_the_path_or_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data_dir: the sequences data set reads a file"):
        DataConfig(dataset="sequences")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match=r"empty: expected one \.txt sequence file.*found 0"):
        load_data(DataConfig(dataset="sequences", data_dir=str(tmp_path / "empty")))
    path = _write_planted(tmp_path / "two")
    (path.parent / "Other.txt").write_text("1 2 3\n")
    with pytest.raises(DataFormatError, match=r"found 2"):
        load_data(DataConfig(dataset="sequences", data_dir=str(path.parent)))
    (path.parent / "Planted_item2attributes.json").write_text('{"5": "brand"}')
    with pytest.raises(DataFormatError, match=r"_item2attributes\.json: expected integer"):
        load_data(DataConfig(dataset="sequences", data_dir=str(path)))


def test_train_and_evaluate_on_a_sequence_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = _write_planted(tmp_path / "set")
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "sequences", "--data-dir", str(path), "--model", "sasrec",
               "--epochs", "2", "--batch-size", "64", "--max-len", "20", "--no-track",
               "--no-progress", "--out-dir", str(out)])  # fmt: skip
    assert rc == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["test"]["users"] == 600
    assert main(["evaluate", "--model", str(out / "model.pt")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["model"]["hr@10"] == pytest.approx(trained["test"]["hr@10"])
