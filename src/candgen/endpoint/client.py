"""Calling the ``retrieve`` ensemble through tritonclient, over HTTP or gRPC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from candgen.errors import CandgenError, ConfigError
from candgen.serving.contract import OUTPUTS
from candgen.serving.pipeline import COLD_START, FALLBACK, RetrievalResult

PROTOCOLS = ("http", "grpc")
DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}


class ServingError(CandgenError):
    """The server answered the request with an error (its message is kept as is)."""


class ServerBusy(ServingError):
    """The server refused the request for lack of capacity (a step's queue was full, or the
    request waited in it past ``ServingConfig.queue_timeout_ms``): retry later or elsewhere."""


# Triton's status for a request its queue policy rejected (gRPC; HTTP answers 503).
BUSY_STATUSES = ("StatusCode.UNAVAILABLE", "503", "UNAVAILABLE")


def client_module(protocol: str) -> Any:
    """``tritonclient.http`` or ``tritonclient.grpc``."""
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ConfigError("protocol", f"must be one of {PROTOCOLS}, got {protocol!r}")
    return module


def triton_client(url: str, protocol: str = "http", timeout_s: float = 10.0) -> Any:
    module = client_module(protocol)
    if protocol == "http":
        return module.InferenceServerClient(
            url, connection_timeout=timeout_s, network_timeout=timeout_s
        )
    return module.InferenceServerClient(url)


class RetrieveClient:
    """One connection to a server that serves the ``retrieve`` ensemble.

    Args:
        url: ``host:port`` (default: 8000 for HTTP, 8001 for gRPC on 127.0.0.1).
        protocol: http or grpc.
        model: the ensemble's name.
        timeout_s: per request.
    """

    def __init__(
        self,
        url: str = "",
        protocol: str = "http",
        model: str = "retrieve",
        timeout_s: float = 10.0,
    ) -> None:
        self.module = client_module(protocol)
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.model = model
        self.timeout_s = timeout_s
        self.client = triton_client(self.url, protocol, timeout_s)

    def infer(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Sends raw tensors (any dtype and shape: the server checks them) and returns outputs.

        Raises:
            ServingError: the server's error message, e.g. for a K out of range.
        """
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        inputs = []
        for name, value in tensors.items():
            value = np.asarray(value)
            t = self.module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            t.set_data_from_numpy(value)
            inputs.append(t)
        outputs = [self.module.InferRequestedOutput(n) for n in OUTPUTS]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            result = self.client.infer(self.model, inputs, outputs=outputs, **kwargs)
        except InferenceServerException as e:
            busy = str(e.status()) in BUSY_STATUSES
            raise (ServerBusy if busy else ServingError)(e.message() or str(e)) from None
        return {n: result.as_numpy(n) for n in OUTPUTS}

    def retrieve(
        self,
        user_id: int,
        scenario: str,
        k: int,
        recent_item_ids: Sequence[int] = (),
        query: str | bytes | None = None,
        context_item_id: int | None = None,
    ) -> RetrievalResult:
        """Candidates for ``user_id`` on ``scenario``, with the search ``query`` (text, or raw
        bytes sent as they are) and the related page's ``context_item_id`` when given.

        Raises:
            ServerBusy: the server was at capacity (retryable).
            ServingError: the server refused the request (its message names the field).
        """
        tensors = {
            "USER_ID": np.array([user_id], dtype=np.int64),
            "SCENARIO": np.array([scenario.encode()], dtype=np.object_),
            "K": np.array([k], dtype=np.int32),
        }
        if recent_item_ids:
            tensors["RECENT_ITEM_IDS"] = np.asarray(recent_item_ids, dtype=np.int64)
        if query is not None:
            raw = query.encode() if isinstance(query, str) else query
            tensors["QUERY"] = np.array([raw], dtype=np.object_)
        if context_item_id is not None:
            tensors["CONTEXT_ITEM_ID"] = np.array([context_item_id], dtype=np.int64)
        # Every tensor carries Triton's batch dimension (one request, one user).
        out = self.infer({name: value[None] for name, value in tensors.items()})
        flag_list = [f.decode() for f in out["FLAGS"].reshape(-1)]
        flags = set(flag_list)
        names = [s.decode() for s in out["SOURCE_NAMES"].reshape(-1)]
        return RetrievalResult(
            ad_ids=out["AD_IDS"].reshape(-1).astype(np.int64).tolist(),
            scores=out["SCORES"].reshape(-1).astype(np.float32).tolist(),
            sources=[s.decode() for s in out["SOURCES"].reshape(-1)],
            cold_start=COLD_START in flags,
            fallback=FALLBACK in flags,
            source_counts=dict(zip(names, out["SOURCE_COUNTS"].reshape(-1).tolist(), strict=True)),
            quota_policy=out["QUOTA_POLICY"].reshape(-1)[0].decode(),
            flags=flag_list,
        )
