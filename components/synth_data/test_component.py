from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp.dsl import Dataset

from candgen.errors import ConfigError
from components.conftest import SMALL
from components.synth_data.component import synth_data


def test_python_func_writes_a_reproducible_marketplace(tmp_path: Path) -> None:
    first, again = Dataset(uri=str(tmp_path / "a")), Dataset(uri=str(tmp_path / "b"))
    snapshot = synth_data.python_func(marketplace=first, **SMALL)
    assert synth_data.python_func(marketplace=again, **SMALL) == snapshot
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["snapshot"] == snapshot == first.metadata["snapshot"]
    assert first.metadata["users"] == SMALL["users"]


def test_a_bad_parameter_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^users:"):
        synth_data.python_func(marketplace=Dataset(uri=str(tmp_path / "m")), users=0)


@pytest.mark.integration
def test_runs_under_kfp_local(kfp_local: Path) -> None:
    task = synth_data(**SMALL)
    out = task.outputs["marketplace"]
    assert (Path(out.path) / "manifest.json").exists()
    assert task.outputs["Output"] == out.metadata["snapshot"]
