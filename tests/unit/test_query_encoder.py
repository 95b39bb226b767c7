"""The serving query encoder (MiniLM as ONNX, ONNX Runtime) gives the ads' text vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from candgen.endpoint.text_onnx import export_onnx
from candgen.errors import CandgenError
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


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("query_encoder")
    settings = export_onnx(folder)
    assert settings == {"model": "all-MiniLM-L6-v2", "dim": EMBEDDING_DIM, "max_tokens": 256}
    return folder


def test_a_query_gets_the_vector_the_ads_text_model_gives_it(exported: Path) -> None:
    encoder = QueryEncoder(exported)
    got = np.stack([encoder.encode(t) for t in TEXTS])
    want = TextEmbedder(None, progress=False).embed(TEXTS)
    assert got.shape == (len(TEXTS), EMBEDDING_DIM) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-5)


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
