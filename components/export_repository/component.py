"""Export a registered version as the Triton model repository (the retrieve ensemble)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from candgen.images import PLATFORM_IMAGE


@dsl.component(base_image=PLATFORM_IMAGE)
def export_repository(
    model_uri: str,
    features: Input[Dataset],
    index: Input[Artifact],
    quotas: Input[Artifact],
    repository: Output[Artifact],
    feature_server_url: str = "http://127.0.0.1:6566",
    feature_timeout_s: float = 0.2,
    max_k: int = 1_000,
    instances: int = 1,
    door_instances: int = 4,
    quota_policy: str = "auto",
    quota_exploration: str = "mean",
    tracking_uri: str = "",
) -> int:
    """Writes the repository to ``repository`` around the index built upstream, with the learned
    quota table (``quotas``) in its select step; returns the exported version.

    Parameters are ``candgen.serving.steps.ServingConfig`` and ``ExportConfig`` fields of the
    same names.
    """
    from pathlib import Path

    from candgen.endpoint.export import ExportConfig, export
    from candgen.serving.quota import QUOTA_FILE
    from candgen.serving.steps import ServingConfig

    serving = ServingConfig(
        feature_server_url=feature_server_url,
        feature_timeout_s=feature_timeout_s,
        max_k=max_k,
        instances=instances,
        door_instances=door_instances,
        quota_policy=quota_policy,
        quota_exploration=quota_exploration,
    )
    config = ExportConfig(
        model_uri=model_uri,
        out=repository.path,
        features_dir=features.path,
        tracking_uri=tracking_uri,
        index_dir=index.path,
        quotas=str(Path(quotas.path) / QUOTA_FILE),
        serving=serving,
    )
    out = export(config, progress=False)
    repository.metadata.update(
        {k: out[k] for k in ("version", "model_uri", "run_id", "git_commit")}
    )
    return int(out["version"])
