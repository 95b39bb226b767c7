"""Evaluate a trained model against the popularity baseline on the held-out days."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from candgen.images import PLATFORM_IMAGE


@dsl.component(base_image=PLATFORM_IMAGE)
def evaluate(
    marketplace: Input[Dataset],
    features: Input[Dataset],
    trained: Input[Model],
    metrics: Output[Metrics],
    split: str = "test",
) -> float:
    """Logs the model's and popularity's metrics (``popularity.*``); returns the model's
    primary metric."""
    import dataclasses
    from pathlib import Path

    from candgen.evaluation.evaluate import evaluate_model, evaluate_popularity
    from candgen.models.factory import load_model
    from candgen.training.config import TrainConfig
    from candgen.training.trainer import load_data

    net, saved = load_model(Path(trained.path) / "model.pt")
    # The data may sit at other paths than where training read it (another pod, another node).
    config = dataclasses.replace(TrainConfig.from_dict(saved["config"]),
                                 data_dir=marketplace.path, features_dir=features.path)  # fmt: skip
    data = load_data(config)
    protocol = config.effective_protocol
    ours = evaluate_model(net, data, split, protocol, config.max_len, config.seed)
    baseline = evaluate_popularity(data, split, protocol, config.seed)
    for name, value in ours.items():
        if "." not in name:
            metrics.log_metric(name, float(value))
            metrics.log_metric(f"popularity.{name}", float(baseline.get(name, float("nan"))))
    return float(ours[config.primary_metric])
