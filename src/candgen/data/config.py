"""Which data set to read: the settings the data layer owns (light: no pandas)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from candgen.errors import ConfigError

DATASETS = ("beauty", "games", "sequences", "marketplace", "planted")


@dataclass(frozen=True)
class DataConfig:
    """Which data set a model learns from and is evaluated on.

    Attributes:
        dataset: beauty, games (../shared/data), sequences (any file in Beauty.txt's format
            at ``data_dir``: one line per user, ``user item1 item2 ...`` in time order, split
            leave-one-out and ranked over every item; ``<name>_item2attributes.json`` beside
            ``<name>.txt`` gives item attributes where it exists), marketplace (a `candgen data
            synth` folder) or planted (a small set with planted structure, for tests).
        data_dir: the data folder (sequences: the file, or a folder holding one .txt); empty
            means ../shared/data or data/marketplace.
        features_dir: marketplace only: a `candgen features build` folder whose ad text
            embeddings and long-term summaries the models read.
        eval_days: marketplace only: days in each of the validation and test windows.
    """

    dataset: str = "beauty"
    data_dir: str = ""
    features_dir: str = ""
    eval_days: int = 1

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError("dataset", f"{self.dataset!r} is not one of {DATASETS}")
        if self.dataset == "sequences" and not self.data_dir:
            raise ConfigError(
                "data_dir",
                "the sequences data set reads a file in Beauty.txt's format "
                "(`user item1 item2 ...` a line): give its path, or a folder holding one .txt",
            )
        if self.eval_days <= 0:
            raise ConfigError("eval_days", f"must be > 0, got {self.eval_days}")

    def data_fields(self) -> dict[str, Any]:
        """This config's own fields (a subclass's other fields left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(DataConfig)}

    def data_config(self) -> DataConfig:
        """The data settings alone (a config that extends them gives just these)."""
        return self if type(self) is DataConfig else DataConfig(**self.data_fields())
