"""The lean online-read front's pure parts: request parsing and the registry refresh loop (the
server itself is tested against a real store in tests/integration/test_feature_server.py)."""

from __future__ import annotations

import threading

import pytest

from candgen.features.online_reads import OnlineReadError, parse_request, refresh_registry_every


def test_a_request_is_parsed_into_what_entities_and_full_names() -> None:
    body = b'{"features": ["v:a", "v:b"], "entities": {"user_id": [1, 2]}}'
    assert parse_request(body) == (["v:a", "v:b"], {"user_id": [1, 2]}, False)
    body = b'{"feature_service": "s_v1", "entities": {"user_id": [3]}, "full_feature_names": true}'
    assert parse_request(body) == ("s_v1", {"user_id": [3]}, True)


@pytest.mark.parametrize(("body", "message"), [
    (b'{"feature_service": "s", "entities": {"user_id": [1]}, "bogus": 1}', r"^bogus: not read"),
    (b'{"feature_service": "s", "entities": {"u": [1]}, "full_feature_names": "yes"}',
     r"^full_feature_names: must be true or false"),
    (b'{"feature_service": "s", "entities": {"u": [1], "v": [1, 2]}}', r"^entities: every entity"),
    (b'{"feature_service": "", "entities": {"u": [1]}}', r"^feature_service: must be a name"),
])  # fmt: skip
def test_a_bad_request_names_the_field(body: bytes, message: str) -> None:
    with pytest.raises(OnlineReadError, match=message) as err:
        parse_request(body)
    assert err.value.status == 400


class _Registry:
    """A store whose registry read fails once, then counts (a stand-in for Feast's)."""

    def __init__(self, stop: threading.Event) -> None:
        self.calls, self.stop = 0, stop

    def refresh_registry(self) -> None:
        self.calls += 1
        if self.calls == 1:
            raise OSError("registry.db is being replaced")
        if self.calls == 3:
            self.stop.set()


def test_the_registry_is_reread_until_stopped_and_a_failed_read_does_not_end_it(
    capsys: pytest.CaptureFixture,
) -> None:
    stop = threading.Event()
    store = _Registry(stop)
    worker = threading.Thread(target=refresh_registry_every, args=(store, 0.01, stop))
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive() and store.calls == 3
    assert "registry refresh failed, serving the last one read" in capsys.readouterr().err
