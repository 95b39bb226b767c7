"""The ads index split into shards by ad id, each on a server of its own, searched as one.

A corpus past one machine's memory is split by ad id (shard ``id % N``, ``shard_of``); each
shard is an ``AdIndex`` served by the ``candgen_ad_shard`` model (``steps.ShardStep``) of its
own tritonserver (in k8s/, one pod of a StatefulSet per shard). ``ShardedIndex`` asks every
shard for its top K at once and merges their answers (``merge_top_k``): every ad of the global
top K is in its own shard's top K, so over exact shards the merge is the unsharded exact top K,
and over ANN shards each shard's recall carries over.

Only numpy and tritonclient: this runs inside the Triton python backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from candgen.errors import CandgenError, ConfigError
from candgen.index.ann import MAX_FETCH, next_fetch

SHARD_MODEL = "candgen_ad_shard"


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """Each ad's shard (``id % shards``): ads spread evenly whatever their id ranges' gaps."""
    if shards < 1:
        raise ConfigError("shards", f"must be >= 1, got {shards}")
    out: np.ndarray = np.asarray(ids, np.int64) % shards
    return out


def merge_top_k(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of several (ids, scores) answers, best first; equal scores: lower id first
    (the same order wherever the shards' answers come from)."""
    ids = np.concatenate([np.asarray(p[0], np.int64) for p in parts]) if parts else np.zeros(0)
    scores = np.concatenate([np.asarray(p[1], np.float32) for p in parts]) if parts else np.zeros(0)
    order = np.lexsort((ids, -scores))[:k]
    return ids[order].astype(np.int64), scores[order].astype(np.float32)


class ShardedIndex:
    """The shards' servers, asked at once and merged.

    Args:
        urls: each shard's gRPC endpoint (host:port), shard i at position i.
        timeout_s: how long one shard may take to answer.
        version: the shard model's version to ask (the exported version the caller serves,
            so that its user vectors meet the ads embedded by the same model; 0: the newest
            each server has).
        model: the shard model's name on those servers.
    """

    def __init__(
        self,
        urls: Sequence[str],
        timeout_s: float = 0.5,
        version: int = 0,
        model: str = SHARD_MODEL,
    ) -> None:
        import tritonclient.grpc as grpcclient

        if not urls:
            raise ConfigError("ad_shard_urls", "needs at least one shard's gRPC endpoint")
        if timeout_s <= 0:
            raise ConfigError("ad_shard_timeout_s", f"must be > 0, got {timeout_s}")
        self.urls, self.timeout_s, self.model = list(urls), timeout_s, model
        self.version = str(version) if version else ""
        self._grpc = grpcclient
        self.clients = [grpcclient.InferenceServerClient(url) for url in self.urls]
        self.pool = ThreadPoolExecutor(len(self.urls), thread_name_prefix="ad-shard")
        self.short_answers = 0  # searches left short of k at MAX_FETCH (see search)

    def search(
        self,
        query: np.ndarray,
        k: int,
        exclude: Sequence[int] = (),
        keep: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` ads of all shards for one query vector, less ``exclude``, and of those
        ``keep`` (ad ids -> which may be returned: a request's eligibility, or the ads not
        ineligible now) lets through.

        With ``keep``, each shard is asked for ``next_fetch`` more while fewer than ``k`` pass
        (4 K, then 4 times more), up to ``MAX_FETCH`` a shard: the most a shard answers one
        request (export gives every shard a ``max_k`` of at least that), and a bound on what
        one request costs the shards. An answer still short there is returned short and
        counted in ``short_answers`` (the popularity floor fills the request). A shard whose
        ANN search comes back with fewer than it was asked for is taken to hold no more.

        Raises:
            CandgenError: naming the shard and its endpoint, when one did not answer.
        """
        query = np.asarray(query, np.float32).reshape(1, -1)
        excluded = np.asarray(list(exclude), np.int64).reshape(1, -1)
        fetch = k if keep is None else next_fetch(0, k)
        while True:
            asks = [
                self.pool.submit(self._ask, shard, query, fetch, excluded)
                for shard in range(len(self.clients))
            ]
            parts = [ask.result() for ask in asks]
            # Past the first ``fetch`` merged, a shard's next ads (not asked for) could rank
            # higher than what the others sent, unless every shard sent all it had.
            exhausted = all(len(p[0]) < fetch for p in parts)
            ids, scores = merge_top_k(parts, sum(len(p[0]) for p in parts) if exhausted else fetch)
            if keep is None:
                return ids[:k], scores[:k]
            kept = np.flatnonzero(keep(ids))
            if len(kept) >= k or exhausted or fetch >= MAX_FETCH:
                self.short_answers += int(len(kept) < k and not exhausted)
                return ids[kept[:k]], scores[kept[:k]]
            fetch = next_fetch(fetch, k)

    def _ask(
        self, shard: int, query: np.ndarray, k: int, excluded: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        from tritonclient.utils import InferenceServerException

        grpc = self._grpc
        inputs = [grpc.InferInput("USER_VECTOR", list(query.shape), "FP32")]
        inputs[0].set_data_from_numpy(query)
        inputs.append(grpc.InferInput("K", [1, 1], "INT32"))
        inputs[1].set_data_from_numpy(np.asarray([[k]], np.int32))
        if excluded.shape[1]:  # an empty optional input is left out, not sent empty
            inputs.append(grpc.InferInput("EXCLUDE_IDS", list(excluded.shape), "INT64"))
            inputs[2].set_data_from_numpy(excluded)
        outputs = [grpc.InferRequestedOutput(n) for n in ("AD_IDS", "AD_SCORES")]
        try:
            result: Any = self.clients[shard].infer(
                self.model,
                inputs,
                model_version=self.version,
                outputs=outputs,
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as e:
            raise CandgenError(
                f"ad shard {shard} ({self.urls[shard]}): {e.message() or e}"
            ) from None
        return result.as_numpy("AD_IDS")[0], result.as_numpy("AD_SCORES")[0]

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        for client in self.clients:
            client.close()
