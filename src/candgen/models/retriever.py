"""Top-K retrieval with a trained model: its user encoder plus its item embeddings, and the exact
top-K that the evaluator shares.

Imports neither MLflow nor pandas, so the serving runtime uses it as is;
``candgen.registry.pyfunc`` wraps it as the registered MLflow model (input: a ``history`` column
of item id lists; output: ``item_ids`` and ``scores``, best first, history excluded).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from candgen.data.ids import IdIndex
from candgen.data.tensors import pad_left, relative_timestamps
from candgen.errors import CandgenError, ConfigError
from candgen.models.base import RetrievalModel
from candgen.vocab import DEVICES, scenario_code

DEFAULT_K = 100


def torch_device(name: str, field: str = "device", index: int = 0) -> torch.device:
    """The torch device ``name`` (one of ``DEVICES``) means here: auto is cuda where torch sees a
    GPU, else cpu; ``index`` picks the GPU.

    Raises:
        ConfigError: naming ``field``, for an unknown name or cuda where torch sees no GPU.
    """
    if name not in DEVICES:
        raise ConfigError(field, f"{name!r} is not one of {DEVICES}")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(field, "cuda was asked for but torch sees no GPU")
        return torch.device("cuda", index)
    return torch.device("cpu")


def chunked_topk(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    k: int,
    exclude: Sequence[np.ndarray],
    max_bytes: int = 256 << 20,
) -> torch.Tensor:
    """Exact top-``k`` item ids per query, excluding item 0 and each query's ``exclude`` items.

    Scores are computed for as many queries at a time as fit in ``max_bytes`` of float32
    scores, so memory stays bounded whatever the catalogue size.

    Args:
        queries: (M, D) query vectors.
        item_table: (N + 1, D) item vectors; row 0 is padding.
        k: how many to return (at most N).
        exclude: per query, item ids never to return (its history).
        max_bytes: the most score memory to hold at once.

    Returns:
        (M, k) int64 item ids, best first.
    """
    n_rows = item_table.shape[0]
    if not 0 < k <= n_rows - 1:
        raise ConfigError("k", f"must be in 1..{n_rows - 1} (the catalogue size), got {k}")
    if len(exclude) != queries.shape[0]:
        raise ConfigError("exclude", f"{len(exclude)} lists for {queries.shape[0]} queries")
    chunk = max(1, max_bytes // (4 * n_rows))
    out = []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk]
        scores = q @ item_table.T
        scores[:, 0] = -torch.inf
        rows = np.concatenate(
            [np.full(len(e), i) for i, e in enumerate(exclude[start : start + len(q)])]
            + [np.zeros(0)]
        ).astype(np.int64)
        cols = np.concatenate([*exclude[start : start + len(q)], np.zeros(0)]).astype(np.int64)
        scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
        out.append(scores.topk(k, dim=1).indices.cpu())
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


def _rows(
    name: str, values: Sequence[Sequence[float] | np.ndarray | None], n: int, width: int
) -> torch.Tensor:
    """(n, width) float32 rows of per-request vectors (zeros where a request has none), or a
    CandgenError naming ``name`` when their number or a vector's width is wrong."""
    if len(values) != n:
        raise CandgenError(f"{name}: one vector (or None) per history is needed")
    rows = np.zeros((n, width), dtype=np.float32)
    for row, vector in enumerate(values):
        if vector is None or len(vector) == 0:
            continue
        if len(vector) != width:
            raise CandgenError(
                f"{name}[{row}]: {len(vector)} values, but the model fuses a {width}-d vector"
            )
        rows[row] = vector
    return torch.from_numpy(rows)


class Retriever:
    """Top-K retrieval with a trained model, in the data set's own item ids.

    Args:
        model: the trained model (its user encoder is used).
        item_ids: (N + 1,) external id of each internal id (row 0 is padding).
        item_table: (N + 1, D) item embeddings; computed from the model when None.
        max_len: the longest history the model reads.
        states_only: the model is a generative one whose user states start its decoder
            (``candgen.serving.generative``): it gets no item table (its input embeddings are
            nothing to rank by) and ``retrieve`` refuses. A generative model is refused
            without it.
    """

    def __init__(
        self,
        model: RetrievalModel,
        item_ids: np.ndarray,
        item_table: np.ndarray | None = None,
        max_len: int = 50,
        device: str | torch.device = "cpu",
        states_only: bool = False,
    ) -> None:
        from candgen.models.generative import GenerativeRetriever

        self.generative = isinstance(model, GenerativeRetriever)
        if self.generative and not states_only:
            raise ConfigError(
                "model",
                "a generative model retrieves by beam search over semantic IDs "
                "(GenerativeRetriever.generate, candgen.serving.generative), not by an item table",
            )
        self.device = device if isinstance(device, torch.device) else torch_device(device)
        self.model = model.eval().to(self.device)
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self.index = IdIndex(self.item_ids, skip_first=True)  # row 0: padding
        if self.generative:
            table = torch.zeros(len(self.item_ids), 0)
        elif item_table is None:
            table = model.item_table()
        else:  # a memory-mapped table is read only; torch's warning about it is about writes
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                table = torch.from_numpy(item_table)
        self.item_table = table.float().cpu()  # exact top-K and lookups run on the CPU
        self.max_len = max_len
        # A generative model reads the request through its transducer (the unified one's).
        reader = model.encoder if isinstance(model, GenerativeRetriever) else model
        projection = getattr(reader, "long_term", None)
        # The width of the long-term embedding the model fuses (0: it reads none).
        self.long_term_dim = int(projection.in_features) if projection is not None else 0
        # The request context the model reads: the query text's width (0: none) and whether
        # it reads the context item.
        tower = getattr(reader, "query_tower", None)
        self.query_text_dim = int(tower.net[0].in_features) if tower is not None else 0
        self.reads_context_items = getattr(reader, "context_item", None) is not None

    def encode(self, histories: list[list[int]]) -> list[np.ndarray]:
        """Maps external ids to internal ones; rejects ids outside the vocabulary."""
        out = []
        for row, hist in enumerate(histories):
            for item in hist:
                if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
                    raise CandgenError(f"history[{row}]: item ids must be integers, got {item!r}")
            if not len(hist):
                raise CandgenError(f"history[{row}]: empty; give at least one item id")
            ids = np.asarray(hist, np.int64)
            internal = self.index.rows(ids)  # one lookup for the history
            if (internal < 0).any():
                raise CandgenError(
                    f"history[{row}]: item id {int(ids[internal < 0][0])} is not in the model's "
                    f"vocabulary ({len(self.index):,} items)"
                )
            out.append(internal)
        return out

    @torch.no_grad()
    def user_vectors(
        self,
        histories: list[list[int]],
        times: list[list[float]] | None = None,
        scenarios: list[str] | None = None,
        long_term: list[list[float] | None] | None = None,
        queries: list[np.ndarray | None] | None = None,
        context_items: list[int | None] | None = None,
    ) -> np.ndarray:
        """(len(histories), D) user embeddings: the user encoder after each history.

        Args:
            histories: external item ids, oldest first (all in the vocabulary).
            times: seconds since the epoch of each history item, for models with a time bias
                (HSTU trained on timestamped data); None where there are none.
            scenarios: the surface of each request, for a contextual model (the unified one
                conditions its query on it; others ignore it); None: unknown.
            long_term: each user's long-term embedding (``user_long_term_embedding``), for a
                model that fuses one (others ignore it); None or empty: none yet.
            queries: each request's search query embedded by the ads' language model, for a
                model that reads queries (others ignore it); None: no query.
            context_items: each request's context item (external id), for a model that reads
                one (others ignore it); None: none.
        """
        internal = self.encode(histories)
        batch = {"items": torch.from_numpy(pad_left(internal, self.max_len))}
        if long_term is not None and self.long_term_dim:
            batch["long_term"] = _rows("long_term", long_term, len(histories), self.long_term_dim)
        if queries is not None and self.query_text_dim:
            batch["query_text"] = _rows("queries", queries, len(histories), self.query_text_dim)
        if context_items is not None and self.reads_context_items:
            if len(context_items) != len(histories):
                raise CandgenError("context_items: one item id (or None) per history is needed")
            viewed = []
            for row, item in enumerate(context_items):
                if item is not None and int(item) not in self.index:
                    raise CandgenError(
                        f"context_items[{row}]: item id {int(item)} is not in the model's "
                        f"vocabulary ({len(self.index):,} items)"
                    )
                viewed.append(0 if item is None else self.index[int(item)])
            batch["context_items"] = torch.tensor(viewed, dtype=torch.long)
        if scenarios is not None and self.model.contextual:
            if len(scenarios) != len(histories):
                raise CandgenError("scenarios: one surface per history is needed")
            batch["scenarios"] = torch.tensor([scenario_code(s) for s in scenarios])
        if times is not None:
            if [len(t) for t in times] != [len(h) for h in histories]:
                raise CandgenError("times: one timestamp per history item is needed")
            padded = pad_left([np.asarray(x, np.float64) for x in times], self.max_len, np.float64)
            batch["timestamps"] = relative_timestamps(padded)
        on_device = {name: value.to(self.device) for name, value in batch.items()}
        return self.model.user_embedding(on_device).cpu().numpy()

    @torch.no_grad()
    def retrieve(
        self, histories: list[list[int]], k: int = DEFAULT_K, times: list[list[float]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns (item ids, scores), each (len(histories), k), best first, history excluded."""
        if self.generative:
            raise ConfigError(
                "model",
                "a generative model retrieves by beam search over semantic IDs "
                "(GenerativeRetriever.generate, candgen.serving.generative), not by an item table",
            )
        if not 0 < k <= len(self.index):
            raise CandgenError(f"k: must be in 1..{len(self.index)}, got {k}")
        internal = self.encode(histories)
        queries = torch.from_numpy(self.user_vectors(histories, times))
        top = chunked_topk(queries, self.item_table, k, internal)
        scores = torch.gather(queries @ self.item_table.T, 1, top)
        return self.item_ids[top.numpy()], scores.numpy()
