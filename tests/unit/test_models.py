"""Model shapes, causality, normalisation, id checks and the sampled softmax."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from candgen.models import HSTU, SASRec, TwoTower, sampled_softmax_loss


def _models(num_items: int = 30) -> list[torch.nn.Module]:
    attrs = torch.randint(0, 5, (num_items + 1, 2))
    text = torch.randn(num_items + 1, 6)
    return [
        SASRec(num_items, dim=16, max_len=8, num_heads=2, dropout=0.0),
        HSTU(num_items, dim=16, max_len=8, num_heads=2, dropout=0.0),
        TwoTower(num_items, attrs, (3, 4), text, dim=16, max_len=8, dropout=0.0),
    ]


@pytest.mark.parametrize("model", _models(), ids=["sasrec", "hstu", "two_tower"])
def test_outputs_are_causal_and_shaped(model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    items = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9]])
    batch = {"items": items, "timestamps": torch.arange(8.0).repeat(2, 1) * 60,
             "user_features": torch.tensor([[1, 2], [3, 0]])}  # fmt: skip
    model.eval()
    out = model(batch)
    assert out.shape == (2, 8, 16)
    changed = dict(batch, items=items.clone())
    changed["items"][:, -1] = 11  # only the newest item differs
    out2 = model(changed)
    assert torch.allclose(out[:, :-1], out2[:, :-1], atol=1e-5)
    assert not torch.allclose(out[:, -1], out2[:, -1])
    assert model.item_table().shape == (31, 16)
    assert torch.count_nonzero(model.item_table()[0]) == 0


def test_cosine_models_normalise_both_sides() -> None:
    _, hstu, tower = _models()
    for model in (hstu, tower):
        batch = {"items": torch.tensor([[1, 2, 3]]), "user_features": torch.tensor([[1, 1]])}
        assert torch.allclose(model.user_embedding(batch).norm(dim=-1), torch.ones(1))
        assert torch.allclose(model.embed_items(torch.arange(1, 31)).norm(dim=-1), torch.ones(30))


def test_item_id_outside_the_vocabulary_is_named() -> None:
    model = _models()[0]
    with pytest.raises(ValueError, match=r"items: item id 31 is outside the vocabulary 1\.\.30"):
        model({"items": torch.tensor([[1, 31]])})
    with pytest.raises(ValueError, match="item ids: item id -1"):
        model.embed_items(torch.tensor([-1]))


def test_sampled_softmax_by_hand_with_uniform_negatives() -> None:
    # One query, uniform negatives only: the log-Q shift is the same constant for every logit,
    # so the loss is plain softmax cross-entropy over [positive, negatives].
    table = torch.randn(11, 4, generator=torch.Generator().manual_seed(1))
    q = torch.randn(1, 4, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(5)
    loss = sampled_softmax_loss(q, torch.tensor([3]), lambda ids: table[ids], num_uniform=6,
                                num_items=10, log_popularity=None, temperature=0.5,
                                in_batch=False, generator=gen)  # fmt: skip
    neg = torch.randint(1, 11, (6,), generator=torch.Generator().manual_seed(5))
    logits = torch.cat([q @ table[3:4].T, q @ table[neg].T], dim=1)[0] / 0.5
    logits[1:][neg == 3] = -1e9  # an accidental hit on the positive is not a negative
    expected = -F.log_softmax(logits, dim=0)[0]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_log_q_correction_lowers_the_penalty_of_popular_in_batch_negatives() -> None:
    table = torch.eye(4)
    q = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    pos = torch.tensor([1, 2])
    flat = torch.log(torch.full((4,), 1 / 3))
    skewed = flat.clone()
    skewed[2] = math.log(0.9)  # item 2 (user 0's negative) is very popular

    def user0_loss(log_pop: torch.Tensor) -> float:
        losses = sampled_softmax_loss(
            q,
            pos,
            lambda ids: table[ids],
            num_uniform=0,
            num_items=3,
            log_popularity=log_pop,
            temperature=1.0,
            reduction="none",
        )
        return losses[0].item()

    assert user0_loss(skewed) < user0_loss(flat)


def test_sampled_softmax_needs_negatives() -> None:
    with pytest.raises(ValueError, match="num_uniform > 0 or in_batch"):
        sampled_softmax_loss(torch.ones(1, 2), torch.tensor([1]), lambda i: torch.ones(len(i), 2),
                             num_uniform=0, num_items=3, log_popularity=None,
                             temperature=1.0)  # fmt: skip


def test_an_id_index_finds_rows_by_binary_search_and_skips_the_padding_row() -> None:
    from candgen.data.ids import IdIndex

    index = IdIndex(np.array([0, 30, 10, 20]), skip_first=True)
    assert [index[30], index[10], index[20]] == [1, 2, 3] and len(index) == 3
    assert 0 not in index and 40 not in index and "10" not in index and 10 in index
    assert list(index) == [30, 10, 20] and dict(index) == {30: 1, 10: 2, 20: 3}
    with pytest.raises(KeyError):
        index[0]  # the padding row is no item


def test_fast_dropout_zeroes_its_share_keeps_the_mean_and_follows_the_seed() -> None:
    from candgen.models.sequential import FastDropout

    x = torch.ones(200_000)
    drop = FastDropout(0.5).train()
    torch.manual_seed(3)
    y = drop(x)
    assert abs(float((y == 0).float().mean()) - 0.5) < 0.01
    assert abs(float(y.mean()) - 1.0) < 0.02 and set(y.unique().tolist()) == {0.0, 2.0}
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    assert abs(float((FastDropout(0.2).train()(x) == 0).float().mean()) - 0.2) < 0.01
