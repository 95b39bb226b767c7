"""The generative candidate generator: a sequential transducer writes the next ad's semantic ID,
and beam search keeps to the IDs of the ads this version serves (issue 18).

It runs where torch does (the encoder step). What a request may be shown is kept after the
search, by the generators step (``pipeline.generate``): the search writes ``depth`` ads, more than
an answer takes from it, so that eligibility, caps and the user's history leave enough.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from candgen.errors import ConfigError
from candgen.models.generative import GenerativeRetriever
from candgen.models.retriever import Retriever
from candgen.models.semantic_ids import IdTrie


class GenerativeAds:
    """Ads written by a generative model, constrained to this version's ads.

    Args:
        retriever: a ``Retriever`` over a ``GenerativeRetriever`` (it encodes the histories).
        ad_ids: the ads it may write (external ids; those outside the model's vocabulary, which
            have no semantic ID, are left out and counted in ``unknown_ads``).
        depth: ads written per request.
        beam_width: beams kept per step (default: the model's, at least ``depth``).
    """

    def __init__(
        self,
        retriever: Retriever,
        ad_ids: np.ndarray,
        depth: int,
        beam_width: int = 0,
    ) -> None:
        model = retriever.model
        if not isinstance(model, GenerativeRetriever):
            raise ConfigError(
                "model", f"the generative generator needs a generative model, got {type(model)}"
            )
        if depth < 1:
            raise ConfigError("depth", f"must be >= 1, got {depth}")
        ids = np.unique(np.asarray(ad_ids, np.int64))  # an ad listed twice is one ad
        rows = retriever.index.rows(ids)
        known = rows >= 0
        self.retriever, self.model, self.depth = retriever, model, depth
        self.beam_width = max(beam_width or model.beam_width, depth)
        self.unknown_ads = int((~known).sum())
        if not known.any():
            raise ConfigError(
                "ad_ids",
                f"the generative model knows none of the {len(ids):,} ads: it has no semantic "
                "ID to write for any (was it trained on this catalogue?)",
            )
        codes = model.semantic_ids[torch.from_numpy(rows[known])].cpu().numpy()
        self.ad_ids = ids[known]
        # The trie names ads by their row in the model, as its dense head reads them.
        self.trie = IdTrie(codes, rows[known], model.vocab_sizes)

    @classmethod
    def load(
        cls, model_file: Path, ad_ids: np.ndarray, depth: int, device: str = "cpu"
    ) -> GenerativeAds:
        """The generative model saved as ``model_file`` (a ``model.pt``), over ``ad_ids``."""
        from candgen.models.factory import load_model
        from candgen.models.retriever import torch_device

        where = torch_device(device, "encoder_device")
        model, saved = load_model(Path(model_file))
        retriever = Retriever(
            model, saved.item_ids, None, saved.model.max_len, where, states_only=True
        )
        return cls(retriever, ad_ids, depth)

    @torch.no_grad()
    def write(
        self, states: Sequence[np.ndarray | None]
    ) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Each user state's ads, best first, and their log-probabilities (their dense scores
        with a dense head; None where there is no state: the model knew none of the user's
        items). One search for the batch."""
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(states)
        given = [(row, state) for row, state in enumerate(states) if state is not None]
        if not given:
            return out
        rows = [row for row, _ in given]
        batch = torch.from_numpy(np.stack([state for _, state in given]).astype(np.float32))
        depth = min(self.depth, len(self.ad_ids))
        queries = batch.to(self.retriever.device)
        items, scores = self.model.generate(queries, depth, self.trie, self.beam_width)
        if self.model.dense_weight:
            items, scores = self.model.dense_order(queries, items)
        for row, found, score in zip(rows, items, scores, strict=True):
            kept = found >= 0
            ads = self.retriever.item_ids[found[kept]]
            out[row] = (ads.astype(np.int64), score[kept].astype(np.float32))
        return out
