"""Online features for serving, read from the Feast feature server over HTTP.

Only the standard library is used: the Triton runtime environment holds neither Feast nor pandas.
A user the store does not know comes back as None (the caller serves cold-start candidates); a
server that cannot be reached raises ``FeatureStoreUnavailable`` (the caller falls back and flags
the response).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from candgen.errors import CandgenError


class FeatureStoreUnavailable(CandgenError):
    """The feature server did not answer in time or answered with an error."""


class FeatureServerClient:
    """Reads a feature service for one entity at a time.

    Args:
        url: the feature server, e.g. ``http://127.0.0.1:6566``.
        timeout_s: how long one lookup may take.
    """

    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def lookup(self, service: str, entity: str, key: int) -> dict[str, Any] | None:
        """The service's features for one entity, or None if the store has none of them."""
        body = json.dumps({"feature_service": service, "entities": {entity: [int(key)]}})
        request = urllib.request.Request(
            f"{self.url}/get-online-features", data=body.encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                payload = json.loads(resp.read())
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
            raise FeatureStoreUnavailable(f"feature server {self.url}: {e}") from None
        names = payload["metadata"]["feature_names"]
        values: dict[str, Any] = {}
        found = False
        for name, result in zip(names, payload["results"], strict=True):
            values[name] = result["values"][0]
            found |= name != entity and result["statuses"][0] == "PRESENT"
        return values if found else None
