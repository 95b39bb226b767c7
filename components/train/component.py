"""Train a retrieval model as a TorchX job and log it to MLflow."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from candgen.images import PLATFORM_IMAGE


@dsl.component(base_image=PLATFORM_IMAGE)
def train(
    marketplace: Input[Dataset],
    features: Input[Dataset],
    trained: Output[Model],
    metrics: Output[Metrics],
    model: str = "hstu",
    epochs: int = 30,
    lr: float = 3e-3,
    dim: int = 64,
    max_len: int = 50,
    batch_size: int = 128,
    eval_days: int = 2,
    seed: int = 42,
    primary_metric: str = "ndcg@10",
    tracking_uri: str = "",
    experiment: str = "candgen",
    nproc: int = 2,
) -> str:
    """Launches ``dist.torchrun`` through TorchX (``nproc`` processes, DDP), writes model.pt to
    ``trained`` and logs the run to MLflow; returns the run id.

    Parameters are ``candgen.training.config.TrainConfig`` fields of the same names, except
    ``nproc`` (processes of the TorchX job).
    """
    from candgen.training.config import TrainConfig
    from candgen.training.launch import launch

    config = TrainConfig(
        dataset="marketplace", data_dir=marketplace.path, features_dir=features.path,
        model=model, epochs=epochs, lr=lr, dim=dim, max_len=max_len, batch_size=batch_size,
        eval_days=eval_days, seed=seed, primary_metric=primary_metric, out_dir=trained.path,
        progress=False, tracking_uri=tracking_uri, experiment=experiment,
    )  # fmt: skip
    result = launch(config, nproc=nproc)
    for name, value in result["test"].items():
        if "." not in name:  # the overall metrics; per-label and per-surface ones are in MLflow
            metrics.log_metric(name, float(value))
    trained.metadata.update({"run_id": result["run_id"], "model": model,
                             "primary_metric": primary_metric})  # fmt: skip
    return result["run_id"]
