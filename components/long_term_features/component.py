"""Train the long-term summariser (a TorchX job) and add its daily summaries to the features."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from candgen.images import PLATFORM_IMAGE


@dsl.component(base_image=PLATFORM_IMAGE)
def long_term_features(
    marketplace: Input[Dataset],
    features: Input[Dataset],
    with_long_term: Output[Dataset],
    summariser: Output[Model],
    eval_days: int = 2,
    epochs: int = 20,
    max_len: int = 200,
    all_action_days: float = 7.0,
    seed: int = 42,
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
    """Writes ``features`` plus ``user_long_term_embedding`` (the summariser's embedding of every
    daily user_long_term snapshot) to ``with_long_term``, the summariser to ``summariser``;
    returns the new feature snapshot.

    ``eval_days`` ... ``seed`` are ``SummariserConfig`` fields (``eval_days`` must be the trained
    model's, so the summariser never sees its evaluation windows) and ``scheduler`` ...
    ``work_dir`` ``JobConfig`` fields, as in the train step.
    """
    import json
    import shutil
    from pathlib import Path

    from candgen.training.config import JobConfig
    from candgen.training.long_term import SummariserConfig, build_long_term_features

    config = SummariserConfig(
        eval_days=eval_days,
        epochs=epochs,
        max_len=max_len,
        all_action_days=all_action_days,
        seed=seed,
        out_dir=summariser.path,
    ).train_config(marketplace.path, progress=False)
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
    shutil.copytree(features.path, with_long_term.path, dirs_exist_ok=True)
    summary = build_long_term_features(config, with_long_term.path, job)
    snapshot = json.loads((Path(with_long_term.path) / "manifest.json").read_text())["snapshot"]
    with_long_term.metadata.update(
        {
            "snapshot": snapshot,
            "long_term_rows": summary["rows"],
            "trained_before": summary["trained_before"],
        }
    )
    summariser.metadata.update({f"test.{k}": v for k, v in summary["summariser"].items()})
    return snapshot
