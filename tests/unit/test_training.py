"""The trainer on small data: learning, planted structure, resume, determinism, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from candgen.data.sequences import SequenceData, from_interactions, load_planted
from candgen.errors import CandgenError, ConfigError
from candgen.evaluation.evaluate import evaluate_popularity
from candgen.models.factory import load_model
from candgen.training.config import TrainConfig
from candgen.training.trainer import CHECKPOINT, WeightAverage, train

PLANTED_SEED = 42


@pytest.fixture(scope="module")
def planted() -> SequenceData:
    return load_planted(seed=PLANTED_SEED)


def _config(tmp_path: Path, **kw: object) -> TrainConfig:
    base = {"dataset": "planted", "seed": PLANTED_SEED, "epochs": 12, "batch_size": 64,
            "max_len": 20, "eval_every": 4, "progress": False, "track": False,
            "out_dir": str(tmp_path / "run")}  # fmt: skip
    return TrainConfig(**(base | kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("model", ["sasrec", "hstu", "two_tower"])
def test_loss_decreases(planted: SequenceData, tmp_path: Path, model: str) -> None:
    result = train(_config(tmp_path, model=model, epochs=6), planted)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("model", ["hstu", "two_tower"])
def test_beats_popularity_on_planted_structure(
    planted: SequenceData, tmp_path: Path, model: str
) -> None:
    pop = evaluate_popularity(planted, "test")["hr@10"]
    result = train(_config(tmp_path, model=model), planted)
    hr = result.test_metrics["hr@10"]
    assert pop < 0.25
    assert hr > pop + 0.3 and hr > 2.5 * pop, (hr, pop)


def test_same_config_same_metrics_and_resume_repeats_the_run(
    planted: SequenceData, tmp_path: Path
) -> None:
    full = train(_config(tmp_path / "a", model="sasrec", epochs=4, eval_every=2), planted)
    again = train(_config(tmp_path / "b", model="sasrec", epochs=4, eval_every=2), planted)
    assert full.test_metrics == again.test_metrics

    half = _config(tmp_path / "c", model="sasrec", epochs=2, eval_every=2)
    train(half, planted)
    resumed = train(_config(tmp_path / "c", model="sasrec", epochs=4, eval_every=2,
                            resume=True), planted)  # fmt: skip
    assert [h["epoch"] for h in resumed.history] == [1.0, 2.0, 3.0, 4.0]
    assert resumed.test_metrics == pytest.approx(full.test_metrics)
    _, saved = load_model(resumed.model_path)
    assert saved.num_items == planted.num_items
    assert (tmp_path / "c" / "run" / CHECKPOINT).exists()


def test_a_weight_average_moves_by_one_minus_its_decay_and_swaps_back() -> None:
    layer = torch.nn.Linear(2, 1)
    start = layer.weight.detach().clone()
    average = WeightAverage(layer, decay=0.75)
    with torch.no_grad():
        layer.weight.add_(4.0)
    average.update()
    assert torch.allclose(average.average[0], start + 1.0)
    with average.swapped_in():
        assert torch.allclose(layer.weight, start + 1.0)
    assert torch.allclose(layer.weight, start + 4.0)


def test_training_with_a_weight_average_validates_and_saves_the_average(
    planted: SequenceData, tmp_path: Path
) -> None:
    ema = _config(tmp_path, model="sasrec", epochs=2, eval_every=2, weight_average=0.9)
    result = train(ema, planted)
    saved = torch.load(result.out_dir / CHECKPOINT, weights_only=False)
    served = {n: p.detach() for n, p in load_model(result.model_path).model.named_parameters()}
    for (name, weights), mean in zip(served.items(), saved["weight_average"], strict=True):
        assert torch.equal(weights, mean), name
    assert any(not torch.equal(saved["model"][n], w) for n, w in served.items())
    # the model saved is the one validated: the average, not the weights as trained
    assert result.valid_metrics["ndcg@10"] == pytest.approx(result.history[-1]["valid.ndcg@10"])


def test_resume_continues_the_weight_average_and_refuses_another_decay(
    planted: SequenceData, tmp_path: Path
) -> None:
    ema = {"model": "sasrec", "eval_every": 2, "weight_average": 0.9}
    full = train(_config(tmp_path / "a", epochs=4, **ema), planted)
    train(_config(tmp_path / "b", epochs=2, **ema), planted)
    resumed = train(_config(tmp_path / "b", epochs=4, resume=True, **ema), planted)
    assert resumed.test_metrics == pytest.approx(full.test_metrics)
    kept = [torch.load(r.out_dir / CHECKPOINT, weights_only=False)["weight_average"]
            for r in (full, resumed)]  # fmt: skip
    assert all(torch.allclose(a, b) for a, b in zip(*kept, strict=True))
    with pytest.raises(ConfigError, match=r"weight_average: the checkpoint was trained with 0\.9"):
        train(_config(tmp_path / "b", epochs=5, resume=True, **(ema | {"weight_average": 0.0})),
              planted)  # fmt: skip


def test_resume_refuses_a_different_model_shape(planted: SequenceData, tmp_path: Path) -> None:
    train(_config(tmp_path, model="sasrec", epochs=1), planted)
    with pytest.raises(ConfigError, match="dim: the checkpoint was trained with 64"):
        train(_config(tmp_path, model="sasrec", epochs=2, dim=32, resume=True), planted)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model", "bert4rec", "model: 'bert4rec' is not one of"),
        ("dim", 0, "dim: must be > 0"),
        ("num_heads", 3, "num_heads: 3 does not divide dim 64"),
        ("dropout", 1.0, "dropout: must be in"),
        ("primary_metric", "auc", "primary_metric: expected hr@K"),
        ("lr", -1.0, "lr: must be > 0"),
        ("weight_average", 1.0, r"weight_average: must be in \[0, 1\), got 1.0"),
    ],
)
def test_invalid_config_values_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


def test_empty_dataset_is_a_clear_error() -> None:
    empty = pd.DataFrame({"user_id": [], "item_id": [], "position": [], "timestamp": [],
                          "label": []})  # fmt: skip
    with pytest.raises(CandgenError, match="the dataset is empty"):
        from_interactions(empty, "empty", "none")


def test_users_too_short_to_train_on_are_a_clear_error(tmp_path: Path) -> None:
    # Every user has 3 interactions: one training item each, so no next-item pair to learn.
    df = pd.DataFrame({"user_id": np.repeat([1, 2], 3), "item_id": [1, 2, 3, 2, 3, 1],
                       "position": [0, 1, 2] * 2,
                       "timestamp": pd.Series([pd.NaT] * 6, dtype="datetime64[us, UTC]"),
                       "label": "organic"})  # fmt: skip
    data = from_interactions(df, "tiny", "none")
    with pytest.raises(ValueError, match="no user with two or more interactions"):
        train(_config(tmp_path, epochs=1), data)


def test_marketplace_metrics_split_by_label_and_surface(
    marketplace, features_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    cfg = _config(tmp_path, dataset="marketplace", model="two_tower", epochs=2, eval_every=2,
                  data_dir=str(marketplace.out_dir), features_dir=str(features_dir),
                  eval_days=2)  # fmt: skip
    result = train(cfg)
    m = result.test_metrics
    for key in (
        "hr@10",
        "recall@100",
        "ndcg@50",
        "coverage@100",
        "label.organic.recall@100",
        "label.click.recall@100",
        "label.click.recall@200",
        "surface.home.hr@10",
        "surface.search.recall@50",
    ):
        assert key in m, key
    assert 0.0 < m["coverage@100"] <= 1.0
    # The split metrics average over the users that have such targets.
    assert m["label.click.users"] <= m["users"]
    assert result.feature_service == "user_features_v1,ad_features_v1"
