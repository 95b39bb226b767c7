# No `from __future__ import annotations`: KFP reads the pipeline's annotations as types.
from pathlib import Path

import pytest
from kfp.dsl import Artifact

from candgen.errors import ConfigError
from candgen.serving.quota import GENERATORS, LearnedQuotas
from candgen.vocab import SURFACES
from components.learn_quotas.component import learn_quotas


@pytest.mark.integration
def test_python_func_fits_the_quotas_on_the_validation_window(learned: Artifact) -> None:
    table = LearnedQuotas.load(Path(learned.path) / "quotas.json")
    assert learned.metadata["requests"] == table.fitted["requests"] > 0
    assert table.rank_edges[-1] == 200
    assert {key.split("/")[0] for key in table.alpha} == set(SURFACES)
    assert sum(table.quotas("home", 10, 100).values()) == 100
    assert table.fitted["pooling"] == "empirical"
    assert set(table.fitted["prior_strength"]) == set(GENERATORS)


def test_a_bad_parameter_names_the_field(trainable_data: tuple, tmp_path: Path) -> None:
    market, features = trainable_data
    none = Artifact(uri=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"^max_rank:"):
        learn_quotas.python_func(
            trained=none,
            marketplace=market,
            features=features,
            index=none,
            quotas=Artifact(uri=str(tmp_path / "q")),
            max_rank=0,
        )
    with pytest.raises(ConfigError, match=r"^pooling:"):
        learn_quotas.python_func(
            trained=none,
            marketplace=market,
            features=features,
            index=none,
            quotas=Artifact(uri=str(tmp_path / "q")),
            pooling="hierarchical",
        )
