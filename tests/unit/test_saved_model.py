"""model.pt: a typed, versioned header read in one place; an old or foreign file is refused with
a message that says what it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from candgen.data.config import DataConfig
from candgen.errors import CandgenError
from candgen.models.config import ModelConfig
from candgen.models.factory import build_model, load_model
from candgen.models.saved import FORMAT, VERSION, ModelHeader, read_header, save_model


def _header(**kw: object) -> ModelHeader:
    values: dict[str, object] = {
        "model": ModelConfig(model="hstu", dim=16, max_len=8),
        "data": DataConfig(dataset="planted"),
        "item_ids": np.arange(21, dtype=np.int64),
        "seed": 3,
        "training": {"epochs": 1},
    }
    return ModelHeader(**(values | kw))  # type: ignore[arg-type]


def _saved(tmp_path: Path) -> Path:
    header = _header()
    model = build_model(header.model, header.num_items, torch.zeros(21, 1, dtype=torch.long))
    path = tmp_path / "model.pt"
    save_model(path, model, header)
    return path


def test_the_header_round_trips_and_rebuilds_the_model(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    model, header = load_model(path)
    assert header.model == ModelConfig(model="hstu", dim=16, max_len=8)
    assert header.data == DataConfig(dataset="planted") and header.seed == 3
    assert header.num_items == 20 and header.item_ids.dtype == np.int64
    assert type(model).__name__ == "HSTU" and not model.training
    raw = torch.load(path, weights_only=False)
    assert (raw["format"], raw["version"]) == (FORMAT, VERSION)


def test_the_header_holds_only_the_model_s_own_settings() -> None:
    from candgen.training.config import TrainConfig

    train_config = TrainConfig(dataset="planted", model="hstu", epochs=3)
    assert type(train_config.model_config()) is ModelConfig
    assert "epochs" not in _header(model=train_config.model_config()).to_dict()["model"]
    assert train_config.data_config() == DataConfig(dataset="planted")


def test_a_model_file_of_an_older_candgen_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"config": {"model": "hstu"}, "state_dict": {}, "num_items": 3}, path)
    with pytest.raises(CandgenError, match=r"older candgen \(format 1.*retrain"):
        load_model(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([1, 2, 3], "not a candgen model file"),
        ({"format": "other.model", "version": 2}, "not a candgen model file"),
        ({"format": FORMAT, "version": VERSION + 1, "header": {}}, f"reads format {VERSION}"),
        ({"format": FORMAT, "version": VERSION, "header": {"model": {}}}, "header is damaged"),
    ],
)
def test_a_foreign_or_damaged_file_is_refused(
    tmp_path: Path, content: object, message: str
) -> None:
    path = tmp_path / "foreign.pt"
    torch.save(content, path)
    with pytest.raises(CandgenError, match=message):
        read_header(path)


def test_bytes_that_are_no_torch_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a zip, not a pickle")
    with pytest.raises(CandgenError, match="not a model file torch can read"):
        read_header(path)
    with pytest.raises(CandgenError, match="no such model file"):
        read_header(tmp_path / "missing.pt")
