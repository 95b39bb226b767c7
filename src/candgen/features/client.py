"""Online features for serving, read from the Feast feature server over HTTP.

Only the standard library is used: the Triton runtime environment holds neither Feast nor pandas.
A user the store does not know comes back as None (the caller serves cold-start candidates); a
server that cannot be reached raises ``FeatureStoreUnavailable`` (the caller falls back and flags
the response).
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.parse
from typing import Any

from candgen.errors import CandgenError


class FeatureStoreUnavailable(CandgenError):
    """The feature server did not answer in time or answered with an error."""


class FeatureServerClient:
    """Reads a feature service for one entity or a batch of them.

    Args:
        url: the feature server, e.g. ``http://127.0.0.1:6566``.
        timeout_s: how long one lookup may take.
        service_refs: per feature service, the ``view:feature`` references it stands for.
            A service listed here is asked for by its features, which the Feast feature server
            answers in about half the time of a request by service name (docs/BENCHMARKS.md).
    """

    def __init__(
        self, url: str, timeout_s: float = 0.5, service_refs: dict[str, list[str]] | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.service_refs = dict(service_refs or {})
        parsed = urllib.parse.urlsplit(self.url)
        self._https = parsed.scheme == "https"
        self._host, self._port = parsed.hostname or "127.0.0.1", parsed.port
        # One kept-alive connection per thread (a new TCP connection per lookup costs ~0.2 ms).
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout_s)
            self._local.conn = conn
        return conn

    def _post(self, body: str) -> Any:
        conn = self._connection()
        try:
            conn.request("POST", "/get-online-features", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self._local.conn = None
            raise
        if resp.status != 200:
            raise OSError(f"HTTP {resp.status}: {data[:200]!r}")
        return json.loads(data)

    def lookup(self, service: str, entity: str, key: int) -> dict[str, Any] | None:
        """The service's features for one entity, or None if the store has none of them."""
        return self.lookup_many(service, entity, [key])[0]

    def lookup_many(
        self, service: str, entity: str, keys: list[int]
    ) -> list[dict[str, Any] | None]:
        """The service's features for many entities in one request on the kept-alive
        connection (the feature server reads them with one online read): one dict per key, in
        order, None where the store has none of them."""
        what: dict[str, Any] = (
            {"features": self.service_refs[service]}
            if service in self.service_refs
            else {"feature_service": service}
        )
        payload = self._request({**what, "entities": {entity: [int(k) for k in keys]}})
        names = payload["metadata"]["feature_names"]
        rows: list[dict[str, Any]] = [{} for _ in keys]
        found = [False] * len(keys)
        for name, result in zip(names, payload["results"], strict=True):
            statuses = result["statuses"]
            if len(statuses) != len(keys) or len(result["values"]) != len(keys):
                raise FeatureStoreUnavailable(
                    f"feature server {self.url}: {name}: {len(result['values'])} values for "
                    f"{len(keys)} keys"
                )
            for i, value in enumerate(result["values"]):
                rows[i][name] = value
                found[i] |= name != entity and statuses[i] == "PRESENT"
        return [row if hit else None for row, hit in zip(rows, found, strict=True)]

    def _request(self, body: dict[str, Any]) -> Any:
        text = json.dumps(body)
        try:
            try:
                return self._post(text)
            except (ConnectionError, http.client.RemoteDisconnected):
                return self._post(text)  # the kept-alive connection had been closed
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise FeatureStoreUnavailable(f"feature server {self.url}: {e}") from None

    def read(self, features: list[str], entity: str, keys: list[int]) -> dict[str, list[Any]]:
        """Features (``view:feature``) of many entities in one request: name -> one value per
        key (None where the store has none)."""
        payload = self._request(
            {"features": features, "entities": {entity: [int(k) for k in keys]}}
        )
        names = payload["metadata"]["feature_names"]
        out: dict[str, list[Any]] = {}
        for name, result in zip(names, payload["results"], strict=True):
            out[name] = [
                v if status == "PRESENT" else None
                for v, status in zip(result["values"], result["statuses"], strict=True)
            ]
        return out
