"""Where the encoder step runs its model: the device setting, its errors, and the same vectors on
whichever device this machine picks for ``auto``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from candgen.errors import ConfigError
from candgen.models.retriever import Retriever, torch_device
from candgen.serving.pipeline import UserContext, user_vectors
from candgen.serving.steps import ServingConfig, load_retriever


def test_a_bad_encoder_device_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^encoder_device: 'tpu' is not one of"):
        ServingConfig(encoder_device="tpu")


def test_cuda_is_refused_naming_the_field_where_torch_sees_no_gpu(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        assert torch_device("cuda", "encoder_device") == torch.device("cuda", 0)
        return
    with pytest.raises(ConfigError, match=r"^encoder_device: cuda was asked for but torch"):
        torch_device("cuda", "encoder_device")
    # The step's load refuses before it reads any weights (there are none in this folder).
    with pytest.raises(ConfigError, match=r"^encoder_device: cuda was asked for"):
        load_retriever(tmp_path, "cuda")
    assert torch_device("auto") == torch.device("cpu")


def test_the_encoder_gives_the_same_vectors_on_the_device_auto_picks() -> None:
    from tests.unit.test_serving_steps import _unified

    on_cpu = _unified(query_text_dim=384, context_items=True)
    assert isinstance(on_cpu, Retriever) and on_cpu.device == torch.device("cpu")
    auto = Retriever(on_cpu.model, on_cpu.item_ids, on_cpu.item_table.numpy(), 8, "auto")
    users = [UserContext(history=[5, 6, 7], times=[1.0, 2.0, 3.0]),
             UserContext(history=[9], times=[4.0])]  # fmt: skip
    query = np.full(384, 0.05, np.float32)
    args = (["search", "related"], [query, None], [None, 9])
    # auto moved the model where it runs: the CPU one is read again from the same weights.
    expected = user_vectors(_unified(query_text_dim=384, context_items=True), users, *args)  # type: ignore[arg-type]
    got = user_vectors(auto, users, *args)
    assert auto.item_table.device == torch.device("cpu")  # exact top-K and lookups run there
    untabled = Retriever(_unified().model, on_cpu.item_ids, None, 8, "auto")  # type: ignore[attr-defined]
    assert untabled.item_table.device == torch.device("cpu")
    for e, g in zip(expected, got, strict=True):
        assert e is not None and g is not None
        np.testing.assert_allclose(g, e, atol=1e-5)
