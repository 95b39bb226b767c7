"""A lean HTTP front for Feast's online read, for the serving path's features step.

It answers the Feast feature server's ``POST /get-online-features`` (a feature service by name,
or ``view:feature`` references, for a batch of entities) and ``GET /health``, with the same JSON:
Feast reads the store (``FeatureStore.get_online_features``: Feast owns the key layout) and
Feast's own ``convert_response_to_dict`` (what the feature server calls) writes the answer. What
it leaves out is the feature server's FastAPI stack: request models, metrics, and two thread-pool
hops per request, which cost more than the read on a busy machine
(docs/benchmarks/serving_notes.md, section 10). Push, materialize and the other endpoints stay
with Feast's feature server, which keeps serving other clients.

One thread per connection; the features step keeps one connection per step instance alive.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, cast

from candgen.errors import CandgenError, ConfigError

if TYPE_CHECKING:
    from feast import FeatureStore

    from candgen.features.store import StoreConfig

PATH = "/get-online-features"
MAX_BODY_BYTES = 1 << 20  # a batch of 1,024 users' ids is about 10 KB


class OnlineReadError(CandgenError):
    """A request the server refuses; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


FIELDS = ("feature_service", "features", "entities", "full_feature_names")


def parse_request(body: bytes) -> tuple[str | list[str], dict[str, list[Any]], bool]:
    """What a ``/get-online-features`` body asks for: (a service name or feature references,
    entity name -> keys, full_feature_names).

    Raises:
        OnlineReadError: 400, naming the field at fault.
    """
    try:
        request = json.loads(body)
    except ValueError as e:
        raise OnlineReadError(400, f"body: not JSON ({e})") from None
    if not isinstance(request, dict):
        raise OnlineReadError(400, "body: must be a JSON object")
    unknown = sorted(set(request) - set(FIELDS))
    if unknown:
        raise OnlineReadError(400, f"{unknown[0]}: not read here (the fields read: {FIELDS})")
    full_names = request.get("full_feature_names", False)
    if not isinstance(full_names, bool):
        raise OnlineReadError(400, f"full_feature_names: must be true or false, got {full_names!r}")
    service, refs = request.get("feature_service"), request.get("features")
    if (service is None) == (refs is None):
        raise OnlineReadError(400, "features: give either feature_service or features")
    if service is not None and not (isinstance(service, str) and service):
        raise OnlineReadError(400, f"feature_service: must be a name, got {service!r}")
    if refs is not None and not (
        isinstance(refs, list) and refs and all(isinstance(r, str) and ":" in r for r in refs)
    ):
        raise OnlineReadError(400, "features: must be a list of 'view:feature' references")
    entities = request.get("entities")
    if not (isinstance(entities, dict) and entities):
        raise OnlineReadError(400, "entities: must map an entity name to its keys")
    lengths = set()
    for name, keys in entities.items():
        if not isinstance(keys, list) or not all(
            isinstance(k, int | str) and not isinstance(k, bool) for k in keys
        ):
            raise OnlineReadError(400, f"entities: {name}: must be a list of keys")
        lengths.add(len(keys))
    if len(lengths) != 1 or 0 in lengths:
        raise OnlineReadError(400, "entities: every entity needs the same, non-zero number of keys")
    what: str | list[str] = service if isinstance(service, str) else cast("list[str]", refs)
    return what, entities, full_names


def read_online(
    store: FeatureStore,
    what: str | list[str],
    entities: dict[str, list[Any]],
    full_feature_names: bool = False,
) -> str:
    """The feature server's JSON answer for one request: Feast's read and Feast's conversion.

    Raises:
        OnlineReadError: 404 for a feature service or view the registry does not hold.
    """
    from feast.errors import FeastObjectNotFoundException
    from feast.feature_server_utils import convert_response_to_dict

    try:
        features: Any = (
            store.get_feature_service(what, allow_cache=True) if isinstance(what, str) else what
        )
        response = store.get_online_features(
            features=features, entity_rows=entities, full_feature_names=full_feature_names
        )
    except FeastObjectNotFoundException as e:
        field = "feature_service" if isinstance(what, str) else "features"
        raise OnlineReadError(404, f"{field}: {e}") from None
    return json.dumps(convert_response_to_dict(response.proto))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # kept-alive connections
    # The headers and the body go out in two writes: with Nagle's algorithm on, the body waited
    # for the client's delayed ACK, 40 ms a request (measured: 47 ms per features step).
    disable_nagle_algorithm = True
    server: _OnlineReadServer

    def _answer(self, status: int, body: str) -> None:
        data = body.encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up waiting: nothing to tell it

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(200, '"ok"')
        else:
            self._answer(404, json.dumps({"error": f"path: {self.path} is not served here"}))

    def do_POST(self) -> None:
        try:
            header = self.headers.get("Content-Length") or "0"
            length = int(header) if header.isdigit() else -1
            if not 0 < length <= MAX_BODY_BYTES:
                self.close_connection = True  # an unread body would be taken for a request
                raise OnlineReadError(
                    400, f"Content-Length: {header!r}; 1..{MAX_BODY_BYTES} bytes are read"
                )
            body = self.rfile.read(length)
            if self.path != PATH:
                raise OnlineReadError(404, f"path: {self.path} is not served here; ask {PATH}")
            what, entities, full_names = parse_request(body)
            answer = read_online(self.server.store, what, entities, full_names)
        except OnlineReadError as e:
            self._answer(e.status, json.dumps({"error": str(e)}))
        except Exception as e:  # the store's own failure: answered, never the server's end
            self._answer(500, json.dumps({"error": f"online read: {type(e).__name__}: {e}"}))
        else:
            self._answer(200, answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log: it would cost more than the read


class _OnlineReadServer(ThreadingHTTPServer):
    daemon_threads = True
    store: FeatureStore


def online_read_server(store: FeatureStore, host: str, port: int) -> ThreadingHTTPServer:
    """The server, bound and not yet serving (``serve_forever`` runs it)."""
    if not 0 < port < 65536:
        raise ConfigError("port", f"must be a TCP port (1..65535), got {port}")
    server = _OnlineReadServer((host, port), _Handler)
    server.store = store
    return server


REGISTRY_REFRESH_S = 5.0  # as often as Feast's feature server re-reads it


def refresh_registry_every(store: FeatureStore, seconds: float, stop: threading.Event) -> None:
    """Re-reads the registry every ``seconds`` until ``stop`` (a view or service applied after
    the server started is served within that); a failed read keeps the last one."""
    while not stop.wait(seconds):
        try:
            store.refresh_registry()  # type: ignore[no-untyped-call]
        except Exception as e:  # an unreadable registry for a moment: keep serving the last one
            print(f"registry refresh failed, serving the last one read: {e!r}", file=sys.stderr)


def serve_online_reads(
    cfg: StoreConfig,
    host: str = "127.0.0.1",
    port: int = 6566,
    registry_refresh_s: float = REGISTRY_REFRESH_S,
) -> None:
    """Runs the lean front on ``cfg``'s registry and online store, re-reading the registry
    every ``registry_refresh_s``; blocks."""
    from candgen.features.store import open_store

    store = open_store(cfg)
    server = online_read_server(store, host, port)
    stop = threading.Event()
    threading.Thread(
        target=refresh_registry_every, args=(store, registry_refresh_s, stop), daemon=True
    ).start()
    try:
        server.serve_forever()
    finally:
        stop.set()
