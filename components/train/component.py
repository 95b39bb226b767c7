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
    model: str = "unified",
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
    scheduler: str = "local_cwd",
    replicas: int = 1,
    nproc: int = 2,
    cpus: int = 4,
    memory_mb: int = 16_384,
    gpus: int = 0,
    image: str = "",
    queue: str = "default",
    namespace: str = "candgen",
    service_account: str = "candgen-train",
    work_volume: str = "candgen-work",
    work_dir: str = "/mnt/candgen",
) -> str:
    """Launches ``dist.torchrun`` through TorchX (``replicas`` x ``nproc`` processes, DDP),
    writes model.pt to ``trained`` and logs the run to MLflow; returns the run id.

    ``model`` ... ``experiment`` are ``candgen.training.config.TrainConfig`` fields and
    ``scheduler`` ... ``work_dir`` are ``JobConfig`` fields of the same names. With scheduler
    ``kubernetes`` this step's pod must mount ``work_volume`` at ``work_dir`` (the pipeline does).
    An empty ``image`` means the platform image this step runs in.
    """
    from candgen.training.config import JobConfig, TrainConfig
    from candgen.training.launch import launch

    config = TrainConfig(
        dataset="marketplace",
        data_dir=marketplace.path,
        features_dir=features.path,
        model=model,
        epochs=epochs,
        lr=lr,
        dim=dim,
        max_len=max_len,
        batch_size=batch_size,
        eval_days=eval_days,
        seed=seed,
        primary_metric=primary_metric,
        out_dir=trained.path,
        progress=False,
        tracking_uri=tracking_uri,
        experiment=experiment,
    )
    job = JobConfig.with_image(
        image,
        scheduler=scheduler,
        replicas=replicas,
        nproc=nproc,
        cpus=cpus,
        memory_mb=memory_mb,
        gpus=gpus,
        queue=queue,
        namespace=namespace,
        service_account=service_account,
        work_volume=work_volume,
        work_dir=work_dir,
    )
    result = launch(config, job)
    for name, value in result["test"].items():
        if "." not in name:  # the overall metrics; per-label and per-surface ones are in MLflow
            metrics.log_metric(name, float(value))
    trained.metadata.update(
        {"run_id": result["run_id"], "model": model, "primary_metric": primary_metric}
    )
    return result["run_id"]
