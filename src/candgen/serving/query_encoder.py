"""The search query's embedding at request time: all-MiniLM-L6-v2, the model the ads' texts were
embedded with, run by ONNX Runtime from the graph that ``candgen serving export`` writes
(``candgen.endpoint.text_onnx``), with an LRU cache of recent queries.

Measured in-process on one thread (docs/benchmarks/serving_notes.md, benchmarks/query_encoder.py):
a cache miss costs a few milliseconds for a short query (the int8 graph export writes by default
about 40% less than fp32, torch eager 3x more), a hit a few microseconds.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from candgen.errors import CandgenError, ConfigError

QUERY_ENCODER_DIR = "query_encoder"
ONNX_FILE, TOKENIZER_FILE, SETTINGS_FILE = "model.onnx", "tokenizer.json", "query_encoder.json"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
PRECISIONS = ("int8", "fp32")


class TextEncoder(Protocol):
    """What embeds a query: ``QueryEncoder``, or a stand-in in unit tests of the steps."""

    def encode(self, text: str) -> np.ndarray: ...


def check_precision(precision: str) -> None:
    """Raises a ConfigError naming ``query_encoder_precision`` unless it is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ConfigError(
            "query_encoder_precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )


class QueryEncoder:
    """Query text -> (dim,) float32 L2-normalised embedding: from the fp32 graph the vector
    ``candgen.features.text.TextEmbedder`` gives the same text, from the int8 one a close one.

    Args:
        folder: what ``candgen.endpoint.text_onnx.export_onnx`` wrote.
        cache_size: recent queries whose embeddings are kept (0: no cache).
        threads: ONNX Runtime's intra-op threads for one query.
    """

    def __init__(self, folder: Path, cache_size: int = 10_000, threads: int = 1) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = Path(folder)
        missing = [
            f for f in (ONNX_FILE, TOKENIZER_FILE, SETTINGS_FILE) if not (folder / f).exists()
        ]
        if missing:
            raise CandgenError(
                f"query encoder: {folder} lacks {', '.join(missing)} "
                "(export the version again with `candgen serving export`)"
            )
        settings: dict[str, Any] = json.loads((folder / SETTINGS_FILE).read_text())
        self.model = str(settings["model"])
        self.dim = int(settings["dim"])
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(settings["max_tokens"]))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(folder / ONNX_FILE), options, providers=["CPUExecutionProvider"]
        )
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def encode(self, text: str) -> np.ndarray:
        """The (dim,) embedding of ``text`` (read-only: it may be the cached array)."""
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            self.hits += 1
            return cached
        self.misses += 1
        tokens = self.tokenizer.encode(text)
        rows = (tokens.ids, tokens.attention_mask, tokens.type_ids)
        feeds = {n: np.asarray([r], dtype=np.int64) for n, r in zip(INPUT_NAMES, rows, strict=True)}
        vector = np.asarray(self.session.run(None, feeds)[0][0], dtype=np.float32)
        vector.flags.writeable = False
        if self.cache_size > 0:
            self._cache[text] = vector
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return vector
