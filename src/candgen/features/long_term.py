"""Long-term user interests: a PinnerFormer-style summary of each user's long engagement history,
computed offline and served from Feast.

A summariser (HSTU over the last ``max_len`` actions, no time bias, since ``user_long_term``
holds ids only) is trained with the dense all-action objective: from the state after any
position, predict any of the user's actions in the following ``all_action_days`` days (sampled
softmax, one such action per position per step). Its embedding of every daily snapshot of
``user_long_term.long_item_ids`` is written to ``user_long_term_embedding`` (feature view of the
same name), stamped like the snapshot, so a point-in-time join and the online store see each
day's summary from the time it could have been computed. The unified model fuses it with the
short-term sequence at request time.

This module only applies a trained summariser; ``candgen.training.long_term`` trains one.

    candgen features long-term --data data/marketplace --features-dir data/features
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from candgen.data.synth import snapshot_hash
from candgen.errors import CandgenError
from candgen.features.build import LONG_TERM_SCHEMA, SNAPSHOT_TABLES
from candgen.vocab import LONG_TERM_TABLE


def summarise(
    model_path: Path | str, features_dir: Path | str, batch_size: int = 256, progress: bool = True
) -> dict[str, Any]:
    """Writes ``user_long_term_embedding.parquet``: the summariser's embedding of every snapshot
    in ``user_long_term.parquet`` of ``features_dir``, and updates the features manifest.

    Snapshot ids the summariser does not know are skipped; a snapshot with none it knows gets no
    row (the user has no long-term embedding until one has).

    Returns:
        What was written: rows, users, dimension, the summariser's training cutoff.
    """
    import torch
    from tqdm.auto import tqdm

    from candgen.data.tensors import pad_left
    from candgen.models.factory import load_model

    features_dir = Path(features_dir)
    model, saved = load_model(Path(model_path))
    cutoff = saved.train_cutoff
    if not cutoff:
        raise CandgenError(
            f"model: {model_path} was not trained on a time-split marketplace, "
            "so its training cutoff is unknown; train it on dataset marketplace"
        )
    if model.contextual:
        raise CandgenError(
            f"model: {model_path} is a contextual model; summarise with a "
            "summariser (candgen.training.long_term)"
        )
    source = features_dir / "user_long_term.parquet"
    if not source.exists():
        raise CandgenError(
            f"features_dir: {features_dir} holds no user_long_term table "
            "(run `candgen features build`)"
        )
    snaps = pd.read_parquet(source, columns=["user_id", "event_timestamp", "long_item_ids"])
    index = {int(x): i for i, x in enumerate(saved.item_ids) if i > 0}
    max_len = saved.model.max_len
    sequences = [
        np.fromiter((index[i] for i in ids if i in index), dtype=np.int64)[-max_len:]
        for ids in snaps["long_item_ids"]
    ]
    lengths = np.array([len(s) for s in sequences])
    keep = np.flatnonzero(lengths > 0)
    # Batches of similar length pad little: most early snapshots are far shorter than max_len.
    order = keep[np.argsort(lengths[keep], kind="stable")]
    dim = int(model.embed_items(torch.ones(1, dtype=torch.long)).shape[1])
    vectors = np.zeros((len(snaps), dim), dtype=np.float32)
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in tqdm(
            range(0, len(order), batch_size),
            desc="long-term summaries",
            unit="batch",
            disable=not progress,
        ):
            rows = order[start : start + batch_size]
            width = int(lengths[rows].max())
            items = torch.from_numpy(pad_left([sequences[r] for r in rows], width))
            vectors[rows] = model.user_embedding({"items": items}).numpy()
    written = snaps.iloc[keep]
    table = pa.table(
        {
            "user_id": written["user_id"].to_numpy(np.int64),
            "event_timestamp": pa.array(written["event_timestamp"], type=LONG_TERM_SCHEMA[1].type),
            "long_term_embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors[keep].ravel()), vectors.shape[1]
            ).cast(pa.list_(pa.float32())),
        }
    ).replace_schema_metadata({"trained_before": cutoff, "summariser": str(model_path)})
    pq.write_table(table, features_dir / f"{LONG_TERM_TABLE}.parquet", compression="zstd")
    summary = {
        "rows": len(keep),
        "users": int(written["user_id"].nunique()),
        "dim": int(vectors.shape[1]),
        "trained_before": cutoff,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    _update_manifest(features_dir, summary)
    return summary


def _update_manifest(features_dir: Path, summary: dict[str, Any]) -> None:
    path = features_dir / "manifest.json"
    if not path.exists():
        return
    manifest = json.loads(path.read_text())
    manifest.setdefault("rows", {})[LONG_TERM_TABLE] = summary["rows"]
    manifest["long_term"] = {k: summary[k] for k in ("dim", "trained_before", "users")}
    manifest["snapshot"] = snapshot_hash(features_dir, SNAPSHOT_TABLES)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
