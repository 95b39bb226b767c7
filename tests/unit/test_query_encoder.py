"""The serving query encoder (MiniLM as ONNX, ONNX Runtime) gives the ads' text vectors: exactly
in fp32, and close (cosine 0.98 or more even on the odd texts below) in the int8 graph that export
writes by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from candgen.endpoint.text_onnx import export_onnx
from candgen.errors import CandgenError, ConfigError
from candgen.features.text import EMBEDDING_DIM, TextEmbedder
from candgen.serving.contract import MAX_QUERY_BYTES
from candgen.serving.query_encoder import ONNX_FILE, QueryEncoder

pytestmark = pytest.mark.slow

TEXTS = [
    "red running shoes",
    "Wireless Earbuds, noise-cancelling!",
    "sofá de couro marrom",  # accents, which the model's tokenizer strips
    "跑步鞋",  # CJK characters, one token each
    "x",
    # the longest query the contract takes: more tokens than the model reads (256), so both sides
    # must cut it the same way
    "a " * (MAX_QUERY_BYTES // 2),
]


def _export(tmp_path_factory: pytest.TempPathFactory, precision: str) -> Path:
    folder = tmp_path_factory.mktemp(f"query_encoder_{precision}")
    settings = export_onnx(folder, precision)
    assert settings == {
        "model": "all-MiniLM-L6-v2",
        "dim": EMBEDDING_DIM,
        "max_tokens": 256,
        "precision": precision,
    }
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory, "fp32")


@pytest.fixture(scope="module")
def want() -> np.ndarray:
    return TextEmbedder(None, progress=False).embed(TEXTS)


def _encode_all(folder: Path) -> np.ndarray:
    encoder = QueryEncoder(folder)
    got = np.stack([encoder.encode(t) for t in TEXTS])
    assert got.shape == (len(TEXTS), EMBEDDING_DIM) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    return got


def test_a_query_gets_the_vector_the_ads_text_model_gives_it(
    exported: Path, want: np.ndarray
) -> None:
    np.testing.assert_allclose(_encode_all(exported), want, atol=1e-5)


def test_the_int8_graph_stays_close_to_the_ads_text_model_and_leaves_the_first_layer_fp32(
    tmp_path_factory: pytest.TempPathFactory, exported: Path, want: np.ndarray
) -> None:
    import onnx

    folder = _export(tmp_path_factory, "int8")
    cosine = (_encode_all(folder) * want).sum(axis=1)
    # Measured: 0.984 for the CJK query, 0.988 for "x", above 0.99 for the others.
    assert cosine.min() >= 0.98 and np.median(cosine) >= 0.99, cosine
    assert cosine.min() < 1 - 1e-6  # it is not the fp32 graph under another name
    assert not (folder / ("fp32." + ONNX_FILE)).exists()
    nodes = onnx.load(str(folder / ONNX_FILE)).graph.node
    fp32 = [n.name for n in nodes if n.op_type == "MatMul"]
    # Left in fp32: the first layer's, and the attention's products of two activations (query x
    # key, weights x value), which dynamic quantisation never touches.
    assert any("layer.0/attention/output" in name for name in fp32)
    assert all("layer.0" in name or "/attention/self/MatMul" in name for name in fp32), fp32
    assert any(n.op_type == "MatMulInteger" for n in nodes)
    # The word embeddings (a Gather, 47 MB) stay fp32; the MatMul weights shrink 4x.
    assert (folder / ONNX_FILE).stat().st_size < 0.8 * (exported / ONNX_FILE).stat().st_size


def test_an_unknown_precision_is_a_clear_error_naming_the_field(tmp_path: Path) -> None:
    from candgen.endpoint.export import ExportConfig

    with pytest.raises(ConfigError, match=r"query_encoder_precision.*int8, fp32.*'fp16'"):
        export_onnx(tmp_path / "q", "fp16")
    assert not (tmp_path / "q").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="query_encoder_precision"):
        ExportConfig(model_uri="models:/m@prod", query_encoder_precision="bf16")


def test_recent_queries_come_from_the_cache_least_recent_first_out(exported: Path) -> None:
    encoder = QueryEncoder(exported, cache_size=2)
    first = encoder.encode("lamp")
    assert encoder.encode("lamp") is first and (encoder.hits, encoder.misses) == (1, 1)
    assert not first.flags.writeable  # a caller cannot change what later requests get
    encoder.encode("sofa")
    encoder.encode("lamp")  # lamp is now the most recent
    encoder.encode("desk")  # evicts sofa
    assert (encoder.hits, encoder.misses) == (2, 3)
    encoder.encode("lamp")
    encoder.encode("sofa")
    assert (encoder.hits, encoder.misses) == (3, 4)
    uncached = QueryEncoder(exported, cache_size=0)
    uncached.encode("lamp")
    uncached.encode("lamp")
    assert (uncached.hits, uncached.misses) == (0, 2)
    np.testing.assert_allclose(uncached.encode("lamp"), first, atol=1e-6)


def test_a_folder_without_the_exported_model_is_a_clear_error(
    exported: Path, tmp_path: Path
) -> None:
    with pytest.raises(CandgenError, match=r"query encoder: .* lacks model\.onnx"):
        QueryEncoder(tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in exported.iterdir():
        if f.name != ONNX_FILE:
            (partial / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CandgenError, match=r"lacks model\.onnx \(export the version again"):
        QueryEncoder(partial)
