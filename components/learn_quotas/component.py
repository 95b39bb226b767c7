"""Learn the quotas across candidate generators from the logged outcomes of the held-out days."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from candgen.images import PLATFORM_IMAGE


@dsl.component(base_image=PLATFORM_IMAGE)
def learn_quotas(
    trained: Input[Model],
    marketplace: Input[Dataset],
    features: Input[Dataset],
    index: Input[Artifact],
    quotas: Output[Artifact],
    eval_days: int = 2,
    max_rank: int = 1_000,
    click_weight: float = 1.0,
    conversion_weight: float = 4.0,
    pooling: str = "empirical",
    prior_strength: float = 20.0,
    max_requests: int = 0,
    seed: int = 0,
) -> int:
    """Writes the learned table (``quotas.json``) to ``quotas``; returns the number of logged
    requests it was fitted on.

    Parameters are ``candgen.quotas.learning.QuotaLearnConfig`` fields of the same names;
    the fit replays the model's validation window (``eval_days``) through its generators.
    """
    from pathlib import Path

    from candgen.quotas.learning import QuotaLearnConfig, learn_quotas
    from candgen.serving.quota import QUOTA_FILE

    config = QuotaLearnConfig(
        eval_days=eval_days,
        max_rank=max_rank,
        click_weight=click_weight,
        conversion_weight=conversion_weight,
        pooling=pooling,
        prior_strength=prior_strength,
        max_requests=max_requests,
        seed=seed,
    )
    table = learn_quotas(
        Path(trained.path) / "model.pt",
        Path(marketplace.path),
        Path(features.path),
        config,
        Path(index.path),
        progress=False,
    )
    Path(quotas.path).mkdir(parents=True, exist_ok=True)
    table.save(Path(quotas.path) / QUOTA_FILE)
    quotas.metadata.update(
        {
            "requests": table.fitted["requests"],
            "window": table.fitted["window"],
            "activity_edges": list(table.activity_edges),
        }
    )
    return int(table.fitted["requests"])
