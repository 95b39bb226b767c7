"""`candgen pipeline submit` against a recording HTTP endpoint (no KFP server runs here): the
request kfp.Client sends must carry the checked-in pipeline and the given parameters."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml

from candgen.cli import main
from candgen.orchestrate import PIPELINE_YAML
from tests.net import free_ports

pytestmark = pytest.mark.integration


@pytest.fixture
def kfp_api() -> Iterator[tuple[str, list]]:
    seen: list[tuple[str, str, dict]] = []

    class Api(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else {}
            seen.append((self.command, self.path.split("?")[0], body))
            if self.path.startswith("/apis/v2beta1/experiments") and self.command == "GET":
                reply: dict = {"experiments": []}
            elif self.path.startswith("/apis/v2beta1/experiments"):
                reply = {"experiment_id": "exp-7", "display_name": body.get("display_name")}
            elif self.path.startswith("/apis/v2beta1/runs"):
                reply = {"run_id": "run-42", "experiment_id": "exp-7"}
            else:
                reply = {}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", free_ports()[0]), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()


def test_submit_sends_the_compiled_pipeline_with_the_parameters(
    kfp_api: tuple[str, list], capsys: pytest.CaptureFixture
) -> None:
    host, seen = kfp_api
    assert main(["pipeline", "submit", "--host", host, "--set", "epochs=3", "--set",
                 "triton_url=triton:8000", "--experiment", "ads-retrieval",
                 "--run-name", "nightly"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["run_id"] == "run-42"
    runs = [body for method, path, body in seen if (method, path) == ("POST", "/apis/v2beta1/runs")]
    assert len(runs) == 1
    run = runs[0]
    assert run["experiment_id"] == "exp-7" and run["display_name"] == "nightly"
    assert run["runtime_config"]["parameters"] == {"epochs": 3, "triton_url": "triton:8000"}
    # the spec and its Kubernetes part (the shared claim on the train and deploy steps)
    spec, platform = yaml.safe_load_all(PIPELINE_YAML.read_text())
    assert run["pipeline_spec"] == {"pipeline_spec": spec, "platform_spec": platform}
    experiments = [b for m, p, b in seen if (m, p) == ("POST", "/apis/v2beta1/experiments")]
    assert [e["display_name"] for e in experiments] == ["ads-retrieval"]


def test_a_bad_parameter_is_refused_before_any_request(
    kfp_api: tuple[str, list], capsys: pytest.CaptureFixture
) -> None:
    host, seen = kfp_api
    assert main(["pipeline", "submit", "--host", host, "--set", "epochs=many"]) == 2
    assert "epochs: expected int, got 'many'" in capsys.readouterr().err
    assert seen == []


def test_an_unreachable_server_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    host = f"http://127.0.0.1:{free_ports()[0]}"
    assert main(["pipeline", "submit", "--host", host]) == 2
    assert f"host: submitting to {host} failed" in capsys.readouterr().err
    assert main(["pipeline", "submit", "--host", "ml-pipeline:8888"]) == 2
    assert "host: must be the KFP API's http(s) URL" in capsys.readouterr().err
