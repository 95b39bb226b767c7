"""The serving environment (numpy<2, no Feast/MLflow/pandas) can load and run candgen's models."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from candgen.paths import REPO_ROOT
from candgen.training.config import TrainConfig
from candgen.training.trainer import train

pytestmark = pytest.mark.integration

SERVING_PYTHON = REPO_ROOT / ".venv-serving" / "bin" / "python"

SCRIPT = """
import sys
import numpy
from candgen.models.factory import load_model
from candgen.models.retriever import Retriever
from candgen.index.ann import AdIndex
from candgen.serving.quota import allocate

model, saved = load_model(sys.argv[1])
ids, scores = Retriever(model, saved.item_ids, max_len=20).retrieve([[1, 2, 3]], k=5)
assert len(ids[0]) == 5 and not {1, 2, 3} & set(ids[0].tolist())
heavy = sorted(m for m in ("pandas", "mlflow", "feast", "pyarrow") if m in sys.modules)
print(numpy.__version__, heavy)
"""


def test_serving_env_loads_a_trained_model_without_platform_packages(tmp_path: Path) -> None:
    result = train(TrainConfig(dataset="planted", model="hstu", epochs=1, max_len=20,
                               batch_size=64, progress=False, track=False,
                               out_dir=str(tmp_path / "run")))  # fmt: skip
    proc = subprocess.run([str(SERVING_PYTHON), "-c", SCRIPT, str(result.model_path)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    numpy_version, heavy = proc.stdout.strip().split(" ", 1)
    assert numpy_version.startswith("1."), numpy_version
    assert heavy == "[]"


IMPORT_ALL = """
import importlib
import pkgutil
import sys

import candgen.serving

names = sorted(m.name for m in pkgutil.walk_packages(candgen.serving.__path__, "candgen.serving."))
for name in names:
    importlib.import_module(name)
platform = ("pandas", "pyarrow", "feast", "mlflow", "kfp", "torchx", "sentence_transformers")
print(",".join(names))
print(",".join(sorted(m for m in platform if m in sys.modules)))
"""


def test_every_request_path_module_imports_in_the_serving_env() -> None:
    proc = subprocess.run([str(SERVING_PYTHON), "-c", IMPORT_ALL], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names, platform = proc.stdout.split("\n")[:2]
    # Every module of the request path was imported (the walk found them), and none pulled in
    # a platform package.
    assert {"candgen.serving.steps", "candgen.serving.triton_model"} <= set(names.split(","))
    assert platform == ""


ENCODE = """
import sys
import numpy
from candgen.serving.query_encoder import QueryEncoder

vector = QueryEncoder(sys.argv[1]).encode(sys.argv[2])
platform = ("pandas", "pyarrow", "transformers", "sentence_transformers")
print(numpy.__version__, ",".join(sorted(m for m in platform if m in sys.modules)))
print(" ".join(repr(float(v)) for v in vector))
"""


def test_the_serving_env_embeds_a_query_as_the_ads_text_model_does(tmp_path: Path) -> None:
    import numpy as np

    from candgen.endpoint.text_onnx import export_onnx
    from candgen.features.text import TextEmbedder

    export_onnx(tmp_path / "query_encoder")  # the default, int8 graph: what the server runs
    text = "waterproof hiking boots"
    proc = subprocess.run([str(SERVING_PYTHON), "-c", ENCODE, str(tmp_path / "query_encoder"),
                           text], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    versions, values = proc.stdout.strip().split("\n")
    numpy_version, heavy = versions.split(" ")
    assert numpy_version.startswith("1.") and heavy == ""
    got = np.array([float(v) for v in values.split()], dtype=np.float32)
    want = TextEmbedder(None, progress=False).embed([text])[0]
    assert float(got @ want) >= 0.99 and abs(float(np.linalg.norm(got)) - 1.0) < 1e-5
