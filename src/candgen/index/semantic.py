"""Building the semantic ID table of a trained model's items (what a generative model writes).

The IDs come from the model's item table: behaviour where items were trained on, content where
the model places items by their text (the unified model's cold ads), so that an item's ID is
near the IDs of the items it is used like.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F

from candgen.models.semantic_ids import SemanticIdConfig, SemanticIds, SemanticIdTable
from candgen.paths import replace_atomically


def build_semantic_ids(
    model_path: Path | str, out: Path | str, config: SemanticIdConfig | None = None
) -> dict[str, Any]:
    """Fits residual k-means on ``model_path``'s item embeddings (L2-normalised: the IDs group
    items by direction, not by popularity) and writes every item's ID to ``out``.

    Returns:
        A summary: items, levels, the distinct prefixes at each level, the largest collision
        group, the share of variance the codes leave and the seconds it took.
    """
    from candgen.models.factory import load_model

    config = config or SemanticIdConfig()
    t0 = time.perf_counter()
    loaded = load_model(model_path)
    vectors = F.normalize(loaded.model.item_table()[1:].float(), dim=1).numpy()
    codebooks = SemanticIds.fit(vectors, config)
    item_ids = np.asarray(loaded.header.item_ids[1:], np.int64)
    ids = codebooks.assign(item_ids, vectors)
    result = SemanticIdTable(item_ids, ids, codebooks, source=str(model_path))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(Path(out), result.save)
    left = vectors - codebooks.decode(ids)
    prefixes = [len(np.unique(ids[:, : level + 1], axis=0)) for level in range(ids.shape[1])]
    return {
        "out": str(out),
        "items": len(ids),
        "levels": config.levels,
        "codebook_size": config.codebook_size,
        "distinct_prefixes": prefixes,
        "largest_collision_group": int(ids[:, -1].max()) + 1,
        "residual_variance_share": round(float((left**2).sum() / (vectors**2).sum()), 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
