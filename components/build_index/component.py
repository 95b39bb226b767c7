"""Index a registered version's ad embeddings with FAISS and log its recall to MLflow."""

from kfp import dsl
from kfp.dsl import Artifact, Metrics, Output

from candgen.images import PLATFORM_IMAGE


@dsl.component(base_image=PLATFORM_IMAGE)
def build_index(
    model_uri: str,
    index: Output[Artifact],
    metrics: Output[Metrics],
    kind: str = "auto",
    ef_construction: int = 200,
    ef_search: int = 256,
    hnsw_m: int = 32,
    exact_max: int = 200_000,
    device: str = "cpu",
    recall_k: int = 100,
    tracking_uri: str = "",
) -> float:
    """Writes ``ads.faiss`` (and its ids) to ``index``; returns recall@K against exact search.

    Parameters are ``candgen.index.ann.IndexConfig`` fields of the same names, plus
    ``recall_k`` and ``tracking_uri`` of ``candgen.index.build.build_index``.
    """
    from pathlib import Path

    from candgen.index.ann import IndexConfig
    from candgen.index.build import build_index as build

    config = IndexConfig(
        kind=kind,
        ef_construction=ef_construction,
        ef_search=ef_search,
        hnsw_m=hnsw_m,
        exact_max=exact_max,
        device=device,
    )
    summary = build(
        model_uri, Path(index.path), config, recall_k=recall_k, tracking_uri=tracking_uri
    )
    recall = float(next(v for k, v in summary.items() if k.startswith("recall_at_")))
    metrics.log_metric(f"recall_at_{recall_k}", recall)
    index.metadata.update(
        {"model_uri": model_uri, "kind": summary["kind"], "size": summary["size"]}
    )
    return recall
