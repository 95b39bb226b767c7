"""Synthesize an ads marketplace (users, advertisers, campaigns, ads, items, events)."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from candgen.images import PLATFORM_IMAGE


@dsl.component(base_image=PLATFORM_IMAGE)
def synth_data(
    marketplace: Output[Dataset],
    users: int = 1_000,
    ads: int = 1_500,
    items: int = 0,
    days: int = 14,
    categories: int = 24,
    seed: int = 7,
) -> str:
    """Writes the marketplace (parquet) to ``marketplace``; returns its snapshot hash.

    Parameters are ``candgen.data.synth.SynthConfig`` fields of the same names.
    """
    from pathlib import Path

    from candgen.data.synth import SynthConfig, generate

    config = SynthConfig(
        users=users, ads=ads, items=items, days=days, categories=categories, seed=seed
    )
    summary = generate(config, Path(marketplace.path), overwrite=True, progress=False)
    marketplace.metadata.update({"snapshot": summary.snapshot, **summary.rows})
    return summary.snapshot
