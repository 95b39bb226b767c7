"""Building the serving index from a registered model version.

The index holds the version's ad embeddings (the item table rows whose ids are ads), searched by
inner product as the model was trained. Its recall@K against exact search is measured on a
sample of queries and logged to the version's MLflow run and tags, so a served index traces back
to its model, and its quality is visible in the MLflow UI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from candgen.data.synth import AD_ID_OFFSET
from candgen.errors import CandgenError, ConfigError
from candgen.index.ann import INDEX_FILE, AdIndex, IndexConfig, ad_rows, exact_search, recall_at_k
from candgen.models.generative import GenerativeRetriever


@dataclass(frozen=True)
class RegisteredEmbeddings:
    """A registered version's item table in the data set's own ids."""

    item_ids: np.ndarray
    table: np.ndarray
    config: dict[str, Any]
    model_dir: Path


def registered_artifacts(model_uri: str, tracking_uri: str = "", field: str = "model_uri") -> Path:
    """Downloads a registered pyfunc's artifacts (``models:/name@alias`` or ``runs:/...``) and
    returns their folder (``model.pt``, ``item_embeddings.npy``, ``config.json``).

    Raises:
        CandgenError: naming ``field``, where the URI cannot be loaded.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from candgen.registry.tracking import client

    client(tracking_uri)
    try:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except MlflowException as e:
        raise CandgenError(f"{field}: cannot load {model_uri!r}: {e.message}") from None
    return root / "artifacts"


def load_registered_embeddings(model_uri: str, tracking_uri: str = "") -> RegisteredEmbeddings:
    """Downloads a registered pyfunc's artifacts (``models:/name@alias`` or ``runs:/...``)."""
    from candgen.models.factory import load_model

    art = registered_artifacts(model_uri, tracking_uri)
    table = np.load(art / "item_embeddings.npy")
    model, saved = load_model(art / "model.pt")
    if isinstance(model, GenerativeRetriever):
        raise ConfigError(
            "model_uri",
            f"{model_uri} is a generative model: it retrieves by beam search over semantic "
            "IDs, and its item table is not a space to search",
        )
    return RegisteredEmbeddings(
        item_ids=np.asarray(saved.item_ids, dtype=np.int64),
        table=table,
        config=json.loads((art / "config.json").read_text()),
        model_dir=art,
    )


def build_index(
    model_uri: str,
    out_dir: Path,
    config: IndexConfig | None = None,
    ads_only: bool = True,
    recall_k: int = 100,
    recall_queries: int = 1_000,
    seed: int = 0,
    tracking_uri: str = "",
    embeddings: RegisteredEmbeddings | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Builds and saves the index for a registered version and logs its recall@K.

    Args:
        model_uri: ``models:/<name>@<alias>`` (or ``models:/<name>/<version>``).
        out_dir: where ``ads.faiss`` (and its id file) go.
        config: index settings.
        ads_only: index only ad ids (>= 1,000,000,000); False indexes every item (Amazon sets).
        recall_k: K of the recall measurement.
        recall_queries: how many sampled item vectors (plus noise) serve as queries.
        seed: the query sample's seed.
        tracking_uri: MLflow tracking URI (default: SQLite under the repository).
        embeddings: the version's embeddings when the caller has already downloaded them.
        progress: show a progress bar while the index is built.

    Returns:
        A summary: kind, size, recall, build seconds, and where the index was written.
    """
    import time

    emb = embeddings or load_registered_embeddings(model_uri, tracking_uri)
    # Row 0 is padding (id 0), so it never passes either bound.
    ids, vectors = ad_rows(emb.item_ids, emb.table, AD_ID_OFFSET if ads_only else 1)
    if len(ids) == 0:
        raise CandgenError(f"model_uri: {model_uri} holds no ad embeddings (ads_only=True)")
    t0 = time.perf_counter()
    index = AdIndex.build(ids, vectors, config, progress=progress)
    build_seconds = time.perf_counter() - t0
    k = min(recall_k, len(ids))
    recall = index_recall(index, ids, vectors, k, recall_queries, seed)
    out_dir = Path(out_dir)
    index.save(out_dir / INDEX_FILE)
    summary = {
        "model_uri": model_uri,
        "kind": index.kind,
        "size": len(index),
        "dim": index.dim,
        f"recall_at_{k}": recall,
        "build_seconds": build_seconds,
        "index": str(out_dir / INDEX_FILE),
    }
    (out_dir / "index.json").write_text(json.dumps(summary, indent=2))
    _log_to_registry(model_uri, summary, k, tracking_uri)
    return summary


def index_recall(
    index: AdIndex, ids: np.ndarray, vectors: np.ndarray, k: int, queries: int, seed: int = 0
) -> float:
    """Recall@``k`` of ``index`` against exact search over (``ids``, ``vectors``), on
    ``queries`` sampled vectors plus noise (a tenth of their mean norm, spread over the
    dimensions)."""
    rng = np.random.default_rng(seed)
    sample = vectors[rng.choice(len(vectors), min(queries, len(vectors)), replace=False)]
    scale = float(np.linalg.norm(vectors, axis=1).mean())
    noisy = sample + 0.1 * scale / np.sqrt(vectors.shape[1]) * rng.standard_normal(
        sample.shape
    ).astype(np.float32)
    return recall_at_k(index.search(noisy, k)[0], exact_search(ids, vectors, noisy, k))


def _log_to_registry(model_uri: str, summary: dict[str, Any], k: int, tracking_uri: str) -> None:
    from candgen.registry.tracking import client, resolve_version

    version = resolve_version(model_uri, tracking_uri)
    if version is None:
        return  # a runs:/ URI: no registered version to tag
    mc = client(tracking_uri)
    recall = summary[f"recall_at_{k}"]
    if version.run_id:
        mc.log_metric(version.run_id, f"index.recall_at_{k}", recall)
    mc.set_model_version_tag(version.name, version.version, "index_kind", summary["kind"])
    mc.set_model_version_tag(version.name, version.version, f"index_recall_at_{k}", repr(recall))
