"""The unified multi-task, scenario-adaptive model (issue 6, first part): label heads, scenario
routing, the weighted multi-task loss, and training on the marketplace's labels and surfaces."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from candgen.data.batches import training_windows
from candgen.data.sequences import SequenceData, load_marketplace, load_planted
from candgen.errors import CandgenError, ConfigError
from candgen.models.base import RetrievalModel
from candgen.models.factory import load_model
from candgen.models.sequential import HSTU
from candgen.models.unified import UnifiedHSTU
from candgen.training.config import TrainConfig
from candgen.training.launch import config_flags
from candgen.training.trainer import _TrainingLoss, train
from candgen.vocab import LABELS


def _model(**kw: object) -> UnifiedHSTU:
    torch.manual_seed(0)
    args = {"num_items": 40, "dim": 16, "max_len": 8, "num_blocks": 1, "dropout": 0.0,
            "time_buckets": 0} | kw  # fmt: skip
    return UnifiedHSTU(**args).eval()  # type: ignore[arg-type]


def _items() -> torch.Tensor:
    return torch.tensor([[0, 0, 3, 7, 9, 2, 5, 11], [1, 4, 4, 8, 12, 30, 2, 6]])


def _as_if_trained(model: UnifiedHSTU) -> UnifiedHSTU:
    """The mixture starts as the identity; random scenario embeddings and experts stand in for
    what training learns."""
    torch.manual_seed(1)
    with torch.no_grad():
        model.mixture.scenario.weight.normal_()
        model.mixture.experts.normal_(std=16**-0.5)
    return model


def test_an_untrained_unified_model_starts_as_the_hstu_it_extends() -> None:
    model = _model()
    items = _items()
    torch.manual_seed(0)
    plain = HSTU(num_items=40, dim=16, max_len=8, num_blocks=1, dropout=0.0,
                 time_buckets=0).eval()  # fmt: skip
    with torch.no_grad():
        expected = plain.user_embedding({"items": items})
        for scenario in range(4):
            got = model.user_embedding({"items": items, "scenarios": torch.tensor([scenario] * 2)})
            assert torch.allclose(got, expected, atol=1e-6), scenario


def test_the_scenario_routes_the_query_through_a_gated_mixture() -> None:
    model = _as_if_trained(_model())
    items = _items()
    with torch.no_grad():
        state = model.encode_positions({"items": items, "scenarios": torch.tensor([1, 1])})
        surfaces = model.mixture.scenario(torch.tensor([[1] * 8, [3] * 8]))
        gates = model.mixture.gates(torch.zeros(2, 8, 16), surfaces)
        home = model.user_embedding({"items": items, "scenarios": torch.tensor([1, 1])})
        search = model.user_embedding({"items": items, "scenarios": torch.tensor([2, 2])})
        unknown = model.user_embedding({"items": items})
    assert state.shape == (2, 8, 16)
    assert torch.allclose(gates.sum(-1), torch.ones(2, 8))
    assert not torch.allclose(gates[0], gates[1])  # another surface, another expert mix
    assert not torch.allclose(home, search) and not torch.allclose(home, unknown)
    assert torch.allclose(home.norm(dim=-1), torch.ones(2))  # cosine: served by inner product


def test_each_label_has_its_own_query_head() -> None:
    model = _model(serve_label=LABELS.index("click"))
    items = _items()
    with torch.no_grad():
        model.heads.add_(0.3 * torch.randn_like(model.heads))
        by_label = [model.user_embedding({"items": items, "labels": torch.tensor([c, c])})
                    for c in range(len(LABELS))]  # fmt: skip
        default = model.user_embedding({"items": items})
    assert not torch.allclose(by_label[0], by_label[1])
    assert not torch.allclose(by_label[1], by_label[2])
    assert torch.allclose(default, by_label[1])  # serving asks the click head


def test_out_of_range_codes_name_the_field() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"^scenarios: codes must lie in 0\.\.3"):
        model({"items": _items(), "scenarios": torch.tensor([4, 0])})
    with pytest.raises(ValueError, match=r"^labels: codes must lie in 0\.\.2"):
        model({"items": _items(), "labels": torch.tensor([0, 3])})


@pytest.mark.parametrize(
    ("weights", "untrained"), [((1.0, 0.0, 0.0), [1, 2]), ((0.0, 1.0, 1.0), [0])]
)
def test_a_label_weighted_at_zero_trains_nothing(
    weights: tuple[float, float, float], untrained: list[int]
) -> None:
    model = _model()
    model.train()
    config = TrainConfig(model="unified", label_weights=weights, num_negatives=8)
    loss_fn = _TrainingLoss(model, config, torch.full((41,), -np.log(40.0)))
    targets = torch.tensor([[0, 3, 7, 9, 2, 5, 11, 13], [4, 4, 8, 12, 30, 2, 6, 1]])
    labels = torch.tensor([[0, 0, 1, 2, 0, 1, 2, 0], [1, 0, 2, 0, 1, 0, 2, 1]])
    batch = {"items": _items(), "labels": labels, "scenarios": torch.ones(2, 8, dtype=torch.long)}
    loss = loss_fn(batch, targets, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() > 0
    grad = model.heads.grad
    for head in range(3):
        trained = grad[head].abs().sum().item() > 0
        assert trained == (head not in untrained), (head, weights)


def test_training_windows_carry_each_targets_label_and_surface(marketplace) -> None:  # type: ignore[no-untyped-def]
    data = load_marketplace(marketplace.out_dir, eval_days=2)
    windows = training_windows(data, max_len=20)
    assert windows.target_labels is not None and windows.target_surfaces is not None
    real = windows.targets > 0
    assert set(np.unique(windows.target_labels[real])) <= {0, 1, 2}
    assert set(np.unique(windows.target_surfaces[real])) <= {1, 2, 3}
    assert {1, 2} <= set(np.unique(windows.target_labels[real]))  # ad clicks are there
    # the newest window of a user ends with that user's newest training interaction
    row = int(np.argmax([len(s) for s in data.train]))
    first = int(np.flatnonzero(windows.user_rows == row)[0])
    assert windows.targets[first, -1] == data.train[row][-1]
    assert windows.target_labels[first, -1] == data.train_labels[row][-1]
    assert windows.target_surfaces[first, -1] == data.train_surfaces[row][-1]


def test_the_unified_model_trains_on_labels_and_surfaces(
    marketplace, features_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    config = TrainConfig(dataset="marketplace", model="unified", data_dir=str(marketplace.out_dir),
                         features_dir=str(features_dir), epochs=4, eval_every=2, eval_days=2,
                         max_len=20, batch_size=64, progress=False, track=False, seed=3,
                         out_dir=str(tmp_path / "run"))  # fmt: skip
    result = train(config)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0], losses
    assert "label.conversion.recall@100" in result.test_metrics
    model, saved = load_model(tmp_path / "run" / "model.pt")
    assert isinstance(model, UnifiedHSTU) and saved.has_labels
    assert model.serve_label == LABELS.index("click")


def test_without_labels_it_serves_the_organic_head(tmp_path: Path) -> None:
    config = TrainConfig(dataset="planted", model="unified", epochs=1, max_len=10, batch_size=64,
                         progress=False, track=False, out_dir=str(tmp_path))  # fmt: skip
    train(config, load_planted(seed=1))
    model, _ = load_model(tmp_path / "model.pt")
    assert model.serve_label == LABELS.index("organic")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("label_weights", (1.0, 1.0), "label_weights: need 3 weights"),
        ("label_weights", (1.0, -1.0, 1.0), "label_weights: need 3 weights >= 0"),
        ("label_weights", (0.0, 0.0, 0.0), "label_weights: .*positive sum"),
        ("num_experts", 0, "num_experts: must be >= 1"),
        ("serve_label", "view", "serve_label: 'view' is not one of"),
    ],
)
def test_bad_multitask_settings_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        TrainConfig(model="unified", **{field: value})  # type: ignore[arg-type]


def test_label_weights_round_trip_through_the_cli_flags() -> None:
    from candgen.cli import build_parser, config_from_args

    config = TrainConfig(model="unified", label_weights=(0.5, 1.0, 3.0), num_experts=2)
    flags = config_flags(config)
    assert flags[flags.index("--label-weights") :][:4] == ["--label-weights", "0.5", "1.0", "3.0"]
    args = build_parser().parse_args(["train", *flags])
    assert config_from_args(TrainConfig, args) == config  # what TorchX workers are given


class _LabelOracle(RetrievalModel):
    """A stub contextual model: the query for label l points at item l + 1, whatever the
    history, so each label's own query ranks that label's target first."""

    contextual = True

    def __init__(self) -> None:
        super().__init__(num_items=120, similarity="dot", temperature=1.0)
        table = torch.randn(121, 8, generator=torch.Generator().manual_seed(0)) * 0.01
        table[1:4] = torch.eye(3, 8)
        self.register_buffer("table", table)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a model has parameters

    def raw_item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]

    def encode_positions(self, batch: dict) -> torch.Tensor:
        items = batch["items"]
        labels = batch.get("labels", torch.ones(items.shape[0], dtype=torch.long))
        query = 10 * torch.eye(3, 8)[labels] + self.anchor
        return query[:, None, :].expand(items.shape[0], items.shape[1], 8)

    def user_states(self, batch: dict) -> torch.Tensor:
        return torch.zeros(*batch["items"].shape, 8)

    def context_queries(self, states: torch.Tensor, context: dict) -> torch.Tensor:
        return 10 * torch.eye(3, 8)[context["labels"]] + self.anchor + states


def test_each_target_is_ranked_by_the_query_for_its_own_label_and_surface() -> None:
    from candgen.data.sequences import EvalSet, SequenceData
    from candgen.evaluation.evaluate import evaluate_model

    test = EvalSet(users=np.array([0, 1]), histories=[np.array([9, 10]), np.array([11])],
                   history_times=None, target_user=np.array([0, 0, 1]),
                   target_item=np.array([1, 2, 3]),
                   target_label=np.array(["organic", "click", "conversion"], dtype=object),
                   target_surface=np.array(["home", "search", "home"], dtype=object))  # fmt: skip
    data = SequenceData(name="marketplace", item_ids=np.arange(121), user_ids=np.array([5, 6]),
                        train=[np.array([9, 10]), np.array([11])], train_times=None, valid=test,
                        test=test, item_attributes=np.zeros((121, 1), np.int64))  # fmt: skip
    contextual = evaluate_model(_LabelOracle(), data, "test", "full", max_len=4)
    # 120 items answer K up to 100; K = 200 needs a catalogue of 200
    assert "recall@100" in contextual and "recall@200" not in contextual
    for label in ("organic", "click", "conversion"):
        assert contextual[f"label.{label}.ndcg@10"] == pytest.approx(1.0), label
    # Asked only for the click query (what a context-free evaluation does), the others miss.
    oracle = _LabelOracle()
    oracle.contextual = False
    plain = evaluate_model(oracle, data, "test", "full", max_len=4)
    assert plain["label.click.ndcg@10"] == pytest.approx(1.0)
    assert plain["label.organic.ndcg@10"] < 1.0 and plain["label.conversion.ndcg@10"] < 1.0


def test_serving_asks_the_unified_model_for_the_requests_surface() -> None:
    from candgen.models.retriever import Retriever
    from candgen.serving.pipeline import UserContext, user_vector

    item_ids = np.concatenate([[0], 1_000 + np.arange(1, 41)])
    history = [[1_003, 1_007, 1_009], [1_002, 1_030]]
    unified = Retriever(_as_if_trained(_model()), item_ids, max_len=8)
    home = unified.user_vectors(history, scenarios=["home", "home"])
    search = unified.user_vectors(history, scenarios=["search", "search"])
    assert not np.allclose(home, search)
    with torch.no_grad():  # the same query the trainer and the evaluator ask for
        expected = unified.model.user_embedding(
            {"items": torch.tensor([[0] * 5 + [3, 7, 9]]), "scenarios": torch.tensor([2])}
        )
    assert np.allclose(search[0], expected[0].numpy(), atol=1e-6)
    context = UserContext(history=history[0])
    assert np.allclose(user_vector(unified, context, "search"), search[0], atol=1e-6)
    assert np.allclose(user_vector(unified, context, "tv"), unified.user_vectors(history[:1])[0])
    with pytest.raises(CandgenError, match=r"^scenarios: one surface per history"):
        unified.user_vectors(history, scenarios=["home"])

    torch.manual_seed(0)
    plain = Retriever(HSTU(40, dim=16, max_len=8, num_blocks=1, dropout=0.0, time_buckets=0),
                      item_ids, max_len=8)  # fmt: skip
    assert np.allclose(plain.user_vectors(history, scenarios=["home", "home"]),
                       plain.user_vectors(history, scenarios=["search", "search"]))  # fmt: skip


def test_a_single_task_baseline_trains_only_on_its_labels_targets(marketplace) -> None:  # type: ignore[no-untyped-def]
    from candgen.data.batches import restrict_targets

    data = load_marketplace(marketplace.out_dir, eval_days=2)
    windows = training_windows(data, max_len=20)
    click = LABELS.index("click")
    only = restrict_targets(windows, [click])
    real = only.targets > 0
    assert real.any() and set(np.unique(only.target_labels[real])) == {click}
    assert int(real.sum()) == int(((windows.target_labels == click) & (windows.targets > 0)).sum())
    assert len(only) < len(windows)  # windows without a click target are dropped
    with pytest.raises(ConfigError, match=r"^train_labels: the data has no labels"):
        restrict_targets(training_windows(load_planted(seed=1), max_len=10), [click])


def test_training_on_one_label_needs_data_with_labels(tmp_path: Path) -> None:
    config = TrainConfig(dataset="planted", model="hstu", epochs=1, train_labels=("click",),
                         progress=False, track=False, out_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(ConfigError, match=r"^train_labels: the data has no labels"):
        train(config, load_planted(seed=1))


def test_without_scenario_adaptation_every_surface_gets_the_same_query() -> None:
    model = _as_if_trained(_model(scenario_adaptive=False))
    items = _items()
    with torch.no_grad():
        home = model.user_embedding({"items": items, "scenarios": torch.tensor([1, 1])})
        search = model.user_embedding({"items": items, "scenarios": torch.tensor([2, 2])})
    assert torch.allclose(home, search)


def test_bad_train_labels_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^train_labels: need one or more of"):
        TrainConfig(train_labels=())
    with pytest.raises(ConfigError, match=r"^train_labels: need one or more of"):
        TrainConfig(train_labels=("click", "view"))


def _planted_with_text_and_cold_items() -> SequenceData:
    """The planted set with a text embedding per item that tells its cluster (as an ad's text
    tells its category), and every tenth item taken out of the training sequences: those have
    no training interaction, like ads first seen after the training cutoff."""
    data = load_planted(seed=1)
    cluster = data.item_attributes[:, 0] - 1
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(cluster.max() + 1, 32))
    text = centres[np.maximum(cluster, 0)] + 0.3 * rng.normal(size=(len(cluster), 32))
    text[0] = 0
    cold = np.zeros(data.num_items + 1, dtype=bool)
    cold[1::10] = True
    return dataclasses.replace(
        data, train=[s[~cold[s]] for s in data.train], item_text=text.astype(np.float32),
        ad_items=np.r_[False, np.ones(data.num_items, dtype=bool)],
    )  # fmt: skip


def test_ads_with_no_training_interaction_are_retrieved_by_their_text(tmp_path: Path) -> None:
    data = _planted_with_text_and_cold_items()
    cold = data.cold_ads
    assert cold.sum() == 30 and cold[data.test.target_item].sum() > 30
    metrics = {}
    for model in ("unified", "hstu"):
        config = TrainConfig(dataset="planted", model=model, epochs=12, eval_every=12, dim=32,
                             max_len=10, batch_size=64, lr=3e-3, progress=False, track=False,
                             out_dir=str(tmp_path / model))  # fmt: skip
        metrics[model] = train(config, data).test_metrics
    unified, hstu = metrics["unified"], metrics["hstu"]
    # HSTU's id embeddings of the cold items never trained: they are found by chance only.
    assert hstu["ads.cold.recall@20"] < 0.1
    assert unified["ads.cold.recall@20"] > 0.5
    assert unified["ads.cold.recall@20"] > 0.5 * unified["ads.warm.recall@20"]
    model, _ = load_model(tmp_path / "unified" / "model.pt")
    ids = torch.from_numpy(np.flatnonzero(cold))
    with torch.no_grad():
        by_text = model.content_vectors(torch.from_numpy(data.item_text[cold]))
        assert torch.allclose(model.embed_items(ids), by_text, atol=1e-6)
        warm = torch.tensor([2, 3])  # a warm item's vector is its id embedding plus its text's
        assert not torch.allclose(model.embed_items(warm), model.content_vectors(
            torch.from_numpy(data.item_text[[2, 3]])))  # fmt: skip


def test_a_model_without_text_has_no_content_tower() -> None:
    assert _model().content is None
    with pytest.raises(ValueError, match=r"^item_text: this model was trained without ad text"):
        _model().content_vectors(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"^item_text: 3 rows, expected 41"):
        _model(item_text=torch.ones(3, 4))
    with pytest.raises(ConfigError, match=r"^content_dropout: must be in \[0, 1\)"):
        TrainConfig(content_dropout=1.0)


def test_without_labels_or_surfaces_the_unified_model_is_hstu(tmp_path: Path) -> None:
    """On a set such as Amazon Beauty there is nothing to adapt to: no heads, no mixture, and
    the same training as HSTU, metric for metric."""
    data = load_planted(seed=1)
    results = {}
    for model in ("unified", "hstu"):
        config = TrainConfig(dataset="planted", model=model, epochs=2, eval_every=1, max_len=10,
                             batch_size=64, progress=False, track=False,
                             out_dir=str(tmp_path / model))  # fmt: skip
        results[model] = train(config, data)
    unified, _ = load_model(tmp_path / "unified" / "model.pt")
    hstu, _ = load_model(tmp_path / "hstu" / "model.pt")
    assert isinstance(unified, UnifiedHSTU) and unified.mixture is None and unified.heads is None
    assert unified.state_dict().keys() == hstu.state_dict().keys()
    assert results["unified"].test_metrics == results["hstu"].test_metrics
    assert [h["loss"] for h in results["unified"].history] == [
        h["loss"] for h in results["hstu"].history]  # fmt: skip


def test_two_models_are_compared_user_by_user_and_bad_pairs_name_the_field(
    marketplace, features_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    from candgen.cli import main
    from candgen.evaluation.evaluate import compare_saved_models

    common = dict(dataset="marketplace", data_dir=str(marketplace.out_dir),
                  features_dir=str(features_dir), epochs=1, eval_days=2, max_len=20,
                  batch_size=64, progress=False, track=False, seed=3)  # fmt: skip
    unified = train(TrainConfig(model="unified", out_dir=str(tmp_path / "u"), **common))
    single = train(TrainConfig(model="hstu", train_labels=("organic",),
                               out_dir=str(tmp_path / "s"), **common))  # fmt: skip
    u, s = tmp_path / "u" / "model.pt", tmp_path / "s" / "model.pt"
    assert main(["evaluate", "--model", str(u), "--against", str(s), "-k", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    # Each side is the model's own test recall, as its training run measured it.
    for group, key in (("all", "recall@100"), ("label.organic", "label.organic.recall@100"),
                       ("label.click", "label.click.recall@100")):  # fmt: skip
        assert out[group]["model"] == pytest.approx(unified.test_metrics[key])
        assert out[group]["baseline"] == pytest.approx(single.test_metrics[key])
        assert out[group]["mean"] == pytest.approx(out[group]["model"] - out[group]["baseline"])
        assert out[group]["low"] <= out[group]["mean"] <= out[group]["high"]
    assert out["label.organic"]["n"] == unified.test_metrics["label.organic.users"]
    # A model against itself: no difference on any user.
    same = compare_saved_models(u, u, k=50)
    assert same["all"]["mean"] == same["all"]["low"] == same["all"]["high"] == 0.0
    assert same["all"]["wins"] == same["all"]["losses"] == 0
    # Models of different evaluation windows cannot be paired; nor can K be 0.
    train(TrainConfig(model="hstu", out_dir=str(tmp_path / "d"), **{**common, "eval_days": 1}))
    with pytest.raises(ConfigError, match=r"^eval_days: the models were trained on different"):
        compare_saved_models(u, tmp_path / "d" / "model.pt")
    assert main(["evaluate", "--model", str(u), "--against", str(s), "-k", "0"]) == 2
    assert "k: must be >= 1" in capsys.readouterr().err


def test_the_request_context_conditions_the_query_and_is_optional() -> None:
    model = _as_if_trained(_model(query_text_dim=6, context_items=True))
    items = _items()
    text = torch.zeros(2, 6)
    text[0, 2] = 1.0  # the first request has a query, the second none
    with torch.no_grad():
        plain = model.user_embedding({"items": items, "scenarios": torch.tensor([2, 2])})
        queried = model.user_embedding(
            {"items": items, "scenarios": torch.tensor([2, 2]), "query_text": text}
        )
        viewed = model.user_embedding(
            {
                "items": items,
                "scenarios": torch.tensor([3, 3]),
                "context_items": torch.tensor([0, 17]),
            }
        )
        related = model.user_embedding({"items": items, "scenarios": torch.tensor([3, 3])})
        # The evaluator's split path (states once, a query per request) gives the same queries.
        states = model.user_states({"items": items})[:, -1]
        split = model.context_queries(
            states, {"scenarios": torch.tensor([2, 2]), "query_text": text}
        )
    assert not torch.allclose(queried[0], plain[0])
    assert torch.allclose(queried[1], plain[1])  # a zero row is no query
    assert torch.allclose(viewed[0], related[0]) and not torch.allclose(viewed[1], related[1])
    assert torch.allclose(split, queried, atol=1e-6)
    with pytest.raises(ConfigError, match="context_items"):
        model.user_embedding({"items": items, "context_items": torch.tensor([0, 41])})


def test_without_context_the_model_has_no_context_towers() -> None:
    from candgen.models.config import ModelConfig
    from candgen.models.factory import build_model

    attrs = torch.zeros(41, 1, dtype=torch.long)
    on = build_model(ModelConfig(model="unified", dim=16), 40, attrs, has_labels=True,
                     query_text_dim=6, has_context_items=True)  # fmt: skip
    off = build_model(ModelConfig(model="unified", dim=16, context=False), 40, attrs,
                      has_labels=True, query_text_dim=6, has_context_items=True)  # fmt: skip
    assert on.query_tower is not None and on.context_item is not None
    assert off.query_tower is None and off.context_item is None
    with pytest.raises(ConfigError, match="context_dropout"):
        ModelConfig(model="unified", context_dropout=1.0)
