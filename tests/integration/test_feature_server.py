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
