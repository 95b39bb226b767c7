"""Compute the offline feature tables (sequences, delivery state, ad text embeddings)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from candgen.images import PLATFORM_IMAGE


@dsl.component(base_image=PLATFORM_IMAGE)
def build_features(
    marketplace: Input[Dataset],
    features: Output[Dataset],
    short_seq_len: int = 20,
    long_seq_len: int = 200,
    delivery_window_days: int = 7,
    embed_text: bool = True,
) -> str:
    """Writes the feature tables to ``features``; returns their snapshot hash.

    Parameters are ``candgen.features.build.FeatureBuildConfig`` fields of the same names.
    """
    from pathlib import Path

    from candgen.features.build import FeatureBuildConfig, build_features

    config = FeatureBuildConfig(
        short_seq_len=short_seq_len,
        long_seq_len=long_seq_len,
        delivery_window_days=delivery_window_days,
        embed_text=embed_text,
    )
    manifest = build_features(Path(marketplace.path), Path(features.path), config, progress=False)
    features.metadata.update({"snapshot": manifest["snapshot"], **manifest["rows"]})
    return manifest["snapshot"]
