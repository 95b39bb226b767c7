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
    primary metric. The data is read from this step's inputs, not from where training saw it
    (another pod, another node)."""
    from pathlib import Path

    from candgen.evaluation.evaluate import evaluate_saved_model

    out = evaluate_saved_model(
        Path(trained.path) / "model.pt",
        split,
        data_dir=marketplace.path,
        features_dir=features.path,
    )
    for name, value in out["model"].items():
        if "." not in name:  # the overall metrics; per-label and per-surface ones are in MLflow
            metrics.log_metric(name, float(value))
            metrics.log_metric(f"popularity.{name}", float(out["popularity"].get(name, "nan")))
    return float(out["model"][out["primary_metric"]])
