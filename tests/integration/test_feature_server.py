"""The Feast feature server over HTTP, as the serving runtime reads it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from candgen.features.client import FeatureServerClient, FeatureStoreUnavailable
from candgen.features.store import StoreConfig, apply, materialize, online_features, open_store
from tests.net import free_ports

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(features_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    state = tmp_path_factory.mktemp("feast_server")
    cfg = StoreConfig(features_dir=features_dir, state_dir=state)
    apply(cfg)
    materialize(cfg)
    port = free_ports()[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "candgen.cli", "features", "serve", "--port", str(port),
         "--features-dir", str(features_dir), "--state-dir", str(state)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    client = FeatureServerClient(f"http://127.0.0.1:{port}", timeout_s=2.0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            client.lookup("user_features_v1", "user_id", 1)
            break
        except FeatureStoreUnavailable:
            time.sleep(0.5)
    yield cfg, client
    os.killpg(proc.pid, 15)
    proc.wait(timeout=20)


def test_http_lookup_equals_the_sdk(server: tuple) -> None:
    cfg, client = server
    sdk = online_features(open_store(cfg), [{"user_id": 5}])
    got = client.lookup("user_features_v1", "user_id", 5)
    assert got is not None
    assert got["country"] == sdk["country"][0]
    assert got["recent_item_ids"] == sdk["recent_item_ids"][0]
    assert got["category_affinity"] == pytest.approx(sdk["category_affinity"][0])


def test_unknown_user_is_none_not_an_error(server: tuple) -> None:
    _, client = server
    assert client.lookup("user_features_v1", "user_id", 987_654_321) is None


def test_unreachable_server_raises_unavailable() -> None:
    client = FeatureServerClient(f"http://127.0.0.1:{free_ports()[0]}", timeout_s=0.5)
    with pytest.raises(FeatureStoreUnavailable, match=r"feature server http://127\.0\.0\.1"):
        client.lookup("user_features_v1", "user_id", 1)


def test_asking_by_the_services_feature_refs_equals_asking_by_its_name(server: tuple) -> None:
    from candgen.features.store import service_feature_refs

    cfg, client = server
    refs = service_feature_refs("user_serving_v1", cfg)
    assert refs == ["user_short_term:recent_item_ids", "user_short_term:recent_timestamps",
                    "user_long_term:category_affinity"]  # fmt: skip
    by_refs = FeatureServerClient(client.url, 2.0, {"user_serving_v1": refs})
    for user in (5, 6, 987_654_321):
        assert by_refs.lookup("user_serving_v1", "user_id", user) == client.lookup(
            "user_serving_v1", "user_id", user
        )


def test_an_unknown_feature_service_is_named() -> None:
    from candgen.errors import ConfigError
    from candgen.features.store import service_feature_refs

    with pytest.raises(ConfigError, match=r"feature_service: unknown feature service 'nope_v9'"):
        service_feature_refs("nope_v9")


@pytest.fixture(scope="module")
def lean(server: tuple) -> Iterator[FeatureServerClient]:
    from candgen.features.store import FeatureServerProcess

    cfg, _ = server
    process = FeatureServerProcess(cfg, free_ports()[0], lean=True)
    process.start()
    yield FeatureServerClient(process.url, timeout_s=2.0)
    process.stop()


def test_the_lean_front_answers_what_feasts_feature_server_answers(
    server: tuple, lean: FeatureServerClient
) -> None:
    from candgen.features.store import service_feature_refs

    cfg, feast_server = server
    refs = service_feature_refs("user_serving_v1", cfg)
    for what in ({"feature_service": "user_serving_v1"}, {"features": refs},
                 {"feature_service": "user_features_v1"},
                 {"features": refs, "full_feature_names": True}):  # fmt: skip
        for users in ([5], [987_654_321], [5, 6, 987_654_321, 7]):
            body = {**what, "entities": {"user_id": users}}
            assert _by_name(lean._request(body)) == _by_name(feast_server._request(body)), (
                what,
                users,
            )
    many = FeatureServerClient(lean.url, 2.0, {"user_serving_v1": refs})
    assert many.lookup_many("user_serving_v1", "user_id", [5, 987_654_321]) == [
        feast_server.lookup("user_serving_v1", "user_id", 5),
        None,
    ]


def _by_name(payload: dict) -> dict:
    """A feature server answer keyed by feature name: Feast orders a service's features within
    a view by a set's order, which differs from one process to another."""
    names = payload["metadata"]["feature_names"]
    assert len(names) == len(payload["results"]) and set(payload) == {"metadata", "results"}
    return dict(zip(names, payload["results"], strict=True))


def _post(url: str, body: bytes, path: str = "/get-online-features") -> tuple[int, str]:
    import http.client
    import json

    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    status, text = resp.status, json.loads(resp.read()).get("error", "")
    conn.close()
    return status, text


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"{not json", 400, r"^body: not JSON"),
    (b"[1, 2]", 400, r"^body: must be a JSON object"),
    (b'{"entities": {"user_id": [1]}}', 400, r"^features: give either feature_service or"),
    (b'{"features": ["a:b"], "feature_service": "x", "entities": {"user_id": [1]}}', 400,
     r"^features: give either"),
    (b'{"features": "user_profile:country", "entities": {"user_id": [1]}}', 400,
     r"^features: must be a list of 'view:feature'"),
    (b'{"feature_service": "user_serving_v1"}', 400, r"^entities: must map"),
    (b'{"feature_service": "user_serving_v1", "entities": {"user_id": []}}', 400,
     r"^entities: every entity needs"),
    (b'{"feature_service": "user_serving_v1", "entities": {"user_id": [1.5]}}', 400,
     r"^entities: user_id: must be a list of keys"),
    (b'{"feature_service": "nope_v9", "entities": {"user_id": [1]}}', 404,
     r"^feature_service: .*nope_v9"),
    (b'{"features": ["no_view:x"], "entities": {"user_id": [1]}}', 404, r"^features: .*no_view"),
])  # fmt: skip
def test_the_lean_front_refuses_a_bad_request_naming_the_field_and_keeps_serving(
    lean: FeatureServerClient, body: bytes, status: int, message: str
) -> None:
    import re

    got_status, error = _post(lean.url, body)
    assert got_status == status and re.search(message, error), (got_status, error)
    assert lean.lookup("user_serving_v1", "user_id", 5) is not None  # still answering


def test_the_lean_front_refuses_a_bad_content_length_and_keeps_serving(
    lean: FeatureServerClient,
) -> None:
    import http.client
    import json

    host, port = lean.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.putrequest("POST", "/get-online-features")
    conn.putheader("Content-Length", "lots")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 400
    assert json.loads(resp.read())["error"].startswith("Content-Length: 'lots'")
    conn.close()
    assert lean.lookup("user_serving_v1", "user_id", 5) is not None


def test_the_lean_front_serves_only_its_path(lean: FeatureServerClient) -> None:
    status, error = _post(lean.url, b'{"feature_service": "user_serving_v1"}', "/push")
    assert status == 404 and error.startswith("path: /push is not served here")
