"""The real tritonserver from the serving environment: start, ready, infer, stop."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from candgen.endpoint.runtime import ServerConfig, start, status, stop
from candgen.endpoint.trace import read_trace
from candgen.errors import CandgenError
from tests.net import free_ports

pytestmark = pytest.mark.integration

CONFIG = """
name: "double"
backend: "python"
max_batch_size: 0
input [ { name: "X", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

# A python-backend model that calls into candgen and torch, as the serving models will.
CANDGEN_CONFIG = CONFIG.replace('"double"', '"quota"').replace(
    '"X", data_type: TYPE_FP32', '"X", data_type: TYPE_INT64'
)

CANDGEN_MODEL = """
import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from candgen.serving.quota import allocate


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            k = int(pb_utils.get_input_tensor_by_name(request, "X").as_numpy()[0])
            picked = allocate(
                {"sequential": [(1, 0.9), (2, 0.8)], "content": [(2, 0.7), (3, 0.5)]},
                {"sequential": 0.5, "content": 0.5}, k,
            )
            scores = torch.tensor([c.score for c in picked], dtype=torch.float32).numpy()
            y = pb_utils.Tensor("Y", scores)
            out.append(pb_utils.InferenceResponse(output_tensors=[y]))
        return out
"""

MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            y = pb_utils.Tensor("Y", (2 * x).astype(np.float32))
            out.append(pb_utils.InferenceResponse(output_tensors=[y]))
        return out
"""


# "double" twice in a row, so that a trace has an ensemble with two steps.
ENSEMBLE_CONFIG = """
name: "quadruple"
platform: "ensemble"
max_batch_size: 0
input [ { name: "X", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ -1 ] } ]
ensemble_scheduling {
  step [
    { model_name: "double", model_version: -1,
      input_map { key: "X", value: "X" }, output_map { key: "Y", value: "TWICE" } },
    { model_name: "double", model_version: -1,
      input_map { key: "X", value: "TWICE" }, output_map { key: "Y", value: "Y" } }
  ]
}
"""


@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    repo = tmp_path / "repo"
    (repo / "double" / "1").mkdir(parents=True)
    (repo / "double" / "config.pbtxt").write_text(textwrap.dedent(CONFIG))
    (repo / "double" / "1" / "model.py").write_text(textwrap.dedent(MODEL))
    (repo / "quota" / "1").mkdir(parents=True)
    (repo / "quota" / "config.pbtxt").write_text(textwrap.dedent(CANDGEN_CONFIG))
    (repo / "quota" / "1" / "model.py").write_text(textwrap.dedent(CANDGEN_MODEL))
    http, grpc, metrics = free_ports(3)
    return ServerConfig(model_repository=str(repo), state_dir=str(tmp_path / "state"),
                        http_port=http, grpc_port=grpc, metrics_port=metrics)  # fmt: skip


def test_start_infer_over_http_and_grpc_then_stop(server_config: ServerConfig) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    info = start(server_config)
    try:
        assert status(server_config)["running"]
        assert info["models"] == ["double", "quota"]
        x = np.array([1.0, 2.5, -3.0], dtype=np.float32)
        for module, url in ((httpclient, info["http"]), (grpcclient, info["grpc"])):
            client = module.InferenceServerClient(url=url)
            inp = module.InferInput("X", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            result = client.infer("double", [inp])
            assert result.as_numpy("Y").tolist() == [2.0, 5.0, -6.0]
        # candgen and torch import inside the python backend (the serving environment).
        inp = httpclient.InferInput("X", [1], "INT64")
        inp.set_data_from_numpy(np.array([3], dtype=np.int64))
        scores = httpclient.InferenceServerClient(url=info["http"]).infer("quota", [inp])
        assert np.allclose(scores.as_numpy("Y"), [0.9, 0.8, 0.5])
        with pytest.raises(CandgenError, match="is running"):
            start(server_config)
    finally:
        assert stop(server_config)
    assert not status(server_config)["running"]
    assert not stop(server_config)  # stopping twice is harmless


def test_a_traced_server_writes_each_request_with_its_steps(
    server_config: ServerConfig, tmp_path: Path
) -> None:
    import tritonclient.grpc as grpcclient

    repo = Path(server_config.model_repository)
    (repo / "quadruple" / "1").mkdir(parents=True)
    (repo / "quadruple" / "config.pbtxt").write_text(textwrap.dedent(ENSEMBLE_CONFIG))
    traced = replace(server_config, trace_file=str(tmp_path / "trace.json"), trace_rate=1)
    info = start(traced)
    try:
        client = grpcclient.InferenceServerClient(url=info["grpc"])
        for _ in range(3):
            inp = grpcclient.InferInput("X", [2], "FP32")
            inp.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
            assert client.infer("quadruple", [inp]).as_numpy("Y").tolist() == [4.0, 8.0]
    finally:
        stop(traced)
    traces = read_trace(tmp_path / "trace.json")
    assert [t.model for t in traces] == ["quadruple"] * 3
    for t in traces:
        assert [s.model for s in t.steps] == ["double", "double"]
        assert all(s.compute_ms > 0 and s.queue_ms >= 0 for s in t.steps)
        assert t.total_ms > max(s.compute_ms for s in t.steps)


def test_a_trace_file_in_a_missing_folder_is_a_clear_error(
    server_config: ServerConfig, tmp_path: Path
) -> None:
    traced = replace(server_config, trace_file=str(tmp_path / "none" / "trace.json"))
    with pytest.raises(CandgenError, match=r"^trace_file: folder .* does not exist"):
        start(traced)
    assert not status(traced)["running"]


def test_a_missing_repository_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CandgenError, match=r"model_repository: .* is not a folder"):
        start(ServerConfig(model_repository=str(tmp_path / "none"),
                           state_dir=str(tmp_path / "s")))  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"repository_poll_s": -1}, r"^repository_poll_s: must be >= 0"),
        ({"repository_poll_s": 5, "explicit_models": ("retrieve",)}, r"^explicit_models: "),
        ({"http_port": 0}, r"^http_port: must be a TCP port"),
        ({"trace_rate": 0}, r"^trace_rate: must be >= 1"),
        ({"exit_timeout_s": -1}, r"^exit_timeout_s: must be >= 0"),
    ],
)
def test_a_bad_server_config_names_the_field(fields: dict, message: str) -> None:
    from candgen.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        ServerConfig(**fields)
