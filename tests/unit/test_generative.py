"""Prefix examples, padding-free batches, and generative retrieval over semantic IDs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from candgen.data.batches import training_windows
from candgen.data.sequences import SequenceData, load_planted
from candgen.errors import ConfigError
from candgen.evaluation.evaluate import evaluate_model, evaluate_popularity, generated_topk
from candgen.index.semantic import build_semantic_ids
from candgen.models.factory import load_model
from candgen.models.generative import GenerativeRetriever
from candgen.models.semantic_ids import SemanticIdConfig, SemanticIdTable
from candgen.models.sequential import HSTU, BSARec, SASRec
from candgen.training.config import TrainConfig
from candgen.training.trainer import train

SEED = 42


@pytest.fixture(scope="module")
def planted() -> SequenceData:
    return load_planted(seed=SEED)


def _config(out: Path, **kw: object) -> TrainConfig:
    base = {"dataset": "planted", "seed": SEED, "epochs": 12, "batch_size": 64, "max_len": 20,
            "eval_every": 4, "progress": False, "track": False, "out_dir": str(out)}  # fmt: skip
    return TrainConfig(**(base | kw))  # type: ignore[arg-type]


def test_prefix_examples_train_each_target_once_from_the_items_before_it(
    planted: SequenceData,
) -> None:
    windows = training_windows(planted, max_len=5, prefixes=True)
    targets = sum(len(seq) - 1 for seq in planted.train)
    assert len(windows) == targets
    assert (windows.targets[:, :-1] == 0).all() and (windows.targets[:, -1] > 0).all()
    # the user's first window: every item before the last, right-aligned, at most max_len
    seq = planted.train[0]
    first = np.flatnonzero(windows.user_rows == 0)[0]
    assert windows.targets[first, -1] == seq[-1]
    before = seq[:-1][-5:]
    assert windows.inputs[first, -len(before) :].tolist() == before.tolist()
    # positions: fewer windows, every position a target
    positions = training_windows(planted, max_len=5)
    assert (positions.targets > 0).sum() == targets and len(positions) < targets


def test_batches_shed_shared_padding_and_length_order_keeps_every_window(
    planted: SequenceData,
) -> None:
    windows = training_windows(planted, max_len=20, prefixes=True)
    lengths = (windows.inputs > 0).sum(axis=1)
    short = np.flatnonzero(lengths <= 3)[:64]
    part = windows.take(short)
    assert part.inputs.shape == (64, int(lengths[short].max()))
    assert part.targets.shape == part.inputs.shape and (part.targets[:, -1] > 0).all()
    assert (part.user_rows == windows.user_rows[short]).all()
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(len(windows))
    order = windows.by_length(shuffled, 64, rng, chunk=4)
    assert sorted(order.tolist()) == list(range(len(windows)))

    def mean_width(o: np.ndarray) -> float:
        return float(np.mean([lengths[o[i : i + 64]].max() for i in range(0, len(o), 64)]))

    assert mean_width(order) < 0.8 * mean_width(shuffled)


@pytest.mark.parametrize("model_class", [SASRec, BSARec, HSTU])
def test_a_state_does_not_depend_on_the_padding_before_it(
    model_class: type[SASRec] | type[BSARec] | type[HSTU],
) -> None:
    torch.manual_seed(0)
    model = model_class(num_items=30, dim=16, max_len=12).eval()
    items = torch.tensor([[0, 0, 3, 7, 9], [0, 4, 5, 6, 2]])
    padded = torch.cat([torch.zeros(2, 7, dtype=torch.long), items], dim=1)
    with torch.no_grad():
        short, long = model({"items": items}), model({"items": padded})
    assert torch.allclose(short[:, -1], long[:, -1], atol=1e-5)
    assert torch.allclose(short[:, 2:], long[:, 9:], atol=1e-5)


def test_generative_retrieval_learns_planted_structure_and_writes_only_real_items(
    planted: SequenceData, tmp_path: Path
) -> None:
    dense = train(
        _config(tmp_path / "dense", model="sasrec", epochs=8, eval_every=8, batch_size=128),
        planted,
    )
    table_path = tmp_path / "ids.npz"
    summary = build_semantic_ids(
        dense.model_path, table_path, SemanticIdConfig(levels=2, codebook_size=8)
    )
    assert summary["items"] == planted.num_items
    assert summary["distinct_prefixes"][-1] == planted.num_items  # every ID is unique
    result = train(
        _config(
            tmp_path / "gen",
            model="generative",
            semantic_ids=str(table_path),
            examples="prefixes",
            batch_by_length=True,
            beam_width=20,
            batch_size=128,
            eval_every=12,
        ),
        planted,
    )
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0], losses
    pop = evaluate_popularity(planted, "test")["hr@10"]
    hr = result.test_metrics["hr@10"]
    assert hr > pop + 0.2, (hr, pop)
    # the saved model carries its ID table and generates the same lists
    model, header = load_model(result.model_path)
    assert isinstance(model, GenerativeRetriever) and header.model.model == "generative"
    again = evaluate_model(model, planted, "test", "full", 20, seed=SEED)
    assert again["hr@10"] == pytest.approx(hr)
    states = torch.randn(5, 64)
    items, scores = model.generate(states, 10)
    assert ((items >= 1) & (items <= planted.num_items)).all()
    assert (np.diff(scores, axis=1) <= 1e-9).all()
    # a subset's trie generates only from the subset (a request's eligible ads)
    table = SemanticIdTable.load(table_path).aligned(planted.item_ids)
    from candgen.models.semantic_ids import IdTrie

    chosen = np.arange(1, planted.num_items + 1, 4)
    sub = IdTrie(table[chosen], chosen, model.vocab_sizes)
    found, _ = model.generate(states, 10, sub)
    assert set(found.ravel().tolist()) <= set(chosen.tolist())
    with pytest.raises(ConfigError, match=r"^protocol: a generative model retrieves"):
        evaluate_model(model, planted, "test", "sampled100", 20)
    # an ANN index of its item table is refused
    from candgen.index.build import load_registered_embeddings

    art = tmp_path / "registered" / "artifacts"
    art.mkdir(parents=True)
    (art / "model.pt").write_bytes(result.model_path.read_bytes())
    np.save(art / "item_embeddings.npy", np.zeros((planted.num_items + 1, 64), np.float32))
    (art / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"^model_uri: .* is a generative model"):
        load_registered_embeddings(str(tmp_path / "registered"))


def test_generative_settings_and_tables_are_checked(planted: SequenceData, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^semantic_ids: the generative model trains on"):
        TrainConfig(model="generative")
    with pytest.raises(ConfigError, match=r"^backbone: 'gru' is not one of"):
        TrainConfig(model="generative", semantic_ids="x.npz", backbone="gru")
    with pytest.raises(ConfigError, match=r"^beam_width: must be >= 1"):
        TrainConfig(beam_width=0)
    with pytest.raises(ConfigError, match=r"^examples: 'all' is not one of"):
        TrainConfig(examples="all")
    # a table built for other items
    from candgen.models.semantic_ids import SemanticIds

    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    ids = SemanticIds.fit(x, SemanticIdConfig(levels=1, codebook_size=3))
    items = np.arange(1, 11) + 10_000
    SemanticIdTable(items, ids.assign(items, x), ids).save(tmp_path / "other.npz")
    with pytest.raises(ConfigError, match=r"^semantic_ids: \d+ items have no ID in the table"):
        train(
            _config(tmp_path / "g", model="generative", semantic_ids=str(tmp_path / "other.npz")),
            planted,
        )


def test_a_dense_head_trains_beside_the_ids_and_orders_the_beams_candidates() -> None:
    from candgen.models.config import ModelConfig
    from candgen.models.losses import full_softmax_loss
    from candgen.training.trainer import _TrainingLoss

    with pytest.raises(ConfigError, match=r"^dense_weight: must be >= 0"):
        ModelConfig(model="generative", dense_weight=-1.0)
    with pytest.raises(ConfigError, match=r"^dense_weight: only the generative model"):
        ModelConfig(model="sasrec", dense_weight=1.0)
    n = 30
    codes = torch.tensor([[0, 0]] + [[i // 6, i % 6] for i in range(n)])
    torch.manual_seed(SEED)
    plain = GenerativeRetriever(SASRec(n, 16, 8), codes, (5, 6), beam_width=12).eval()
    torch.manual_seed(SEED)
    hybrid = GenerativeRetriever(
        SASRec(n, 16, 8), codes, (5, 6), beam_width=12, dense_weight=0.5
    ).eval()
    states = torch.randn(4, 16)
    written, _ = plain.generate(states, 12)
    assert np.array_equal(hybrid.generate(states, 12)[0], written)
    # evaluation: the search chooses the candidates (less the history), the dense head orders
    histories = [np.array([int(written[0, 0])]), np.zeros(0, np.int64)] + [np.zeros(0)] * 2
    ordered = generated_topk(hybrid, states, histories, 12)
    wide, _ = plain.generate(states, 13)  # the search of the chunk: 12 and its longest history
    for row, found in enumerate(wide.tolist()):
        kept = [item for item in found if item not in histories[row].tolist()][:12]
        assert sorted(ordered[row].tolist()) == sorted(kept)
    assert int(written[0, 0]) not in ordered[0].tolist()
    table = hybrid.raw_item_embeddings(torch.arange(n + 1))
    dense = np.take_along_axis((states @ table.T).detach().numpy(), np.maximum(ordered, 0), 1)
    assert (np.diff(np.where(ordered > 0, dense, -np.inf), axis=1) <= 1e-6).all()
    assert not np.array_equal(ordered[1:], written[1:])
    none = np.array([[3, -1]])
    assert hybrid.dense_order(states[:1], none)[0].tolist() == [[3, -1]]
    # training adds the full softmax over the same table, weighted
    config = _config(Path("unused"), model="generative", semantic_ids="x.npz")
    queries, targets = torch.randn(6, 16), torch.randint(1, n + 1, (6,))
    loss = _TrainingLoss(hybrid, config, torch.zeros(n + 1))
    only_ids = hybrid.id_loss(queries, targets)
    hybrid.dense_weight = 0.0
    assert torch.allclose(loss.model.id_loss(queries, targets), only_ids)
    hybrid.dense_weight = 0.5
    dense_loss = full_softmax_loss(queries, targets, table, hybrid.temperature)
    assert torch.allclose(only_ids + 0.5 * dense_loss, _total(loss, queries, targets))


def _total(loss: torch.nn.Module, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss of ``queries`` as the model's own output (a stand-in forward)."""
    model = loss.model
    original = model.forward
    model.forward = lambda batch: queries[:, None]  # type: ignore[method-assign]
    try:
        out: torch.Tensor = loss({}, targets[:, None], torch.Generator())
        return out
    finally:
        model.forward = original  # type: ignore[method-assign]


def test_a_cosine_schedule_ends_near_zero_and_constant_keeps_the_rate(
    planted: SequenceData, tmp_path: Path
) -> None:
    for schedule in ("cosine", "constant"):
        out = tmp_path / schedule
        train(_config(out, model="sasrec", epochs=3, eval_every=3, lr_schedule=schedule), planted)
        saved = torch.load(out / "checkpoint.pt", weights_only=False)
        last = saved["optimizer"]["param_groups"][0]["lr"]
        assert last < 0.02 * 1e-3 if schedule == "cosine" else last == 1e-3
    with pytest.raises(ConfigError, match=r"^lr_schedule: 'linear' is not one of"):
        TrainConfig(lr_schedule="linear")


def _marketplace_settings(marketplace, features_dir: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return dict(dataset="marketplace", data_dir=str(marketplace.out_dir),
                features_dir=str(features_dir), epochs=1, eval_days=2, max_len=20,
                batch_size=64, progress=False, track=False, seed=3)  # fmt: skip


@pytest.fixture(scope="module")
def unified_ids(marketplace, features_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A unified model trained one epoch on the small marketplace, and its items' semantic IDs."""
    out = tmp_path_factory.mktemp("unified")
    common = _marketplace_settings(marketplace, features_dir)
    unified = train(TrainConfig(model="unified", out_dir=str(out / "u"), **common))
    ids = out / "ids.npz"
    build_semantic_ids(unified.model_path, ids, SemanticIdConfig(levels=2, codebook_size=16))
    return unified, ids


def test_a_generative_model_on_the_marketplace_joins_the_unified_models_candidates(
    marketplace, features_dir: Path, unified_ids, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """Semantic IDs from the unified model's items (text where an ad is cold), a generative
    model over them, and the union of both lists at the same K, paired per user."""
    from candgen.cli import main
    from candgen.evaluation.evaluate import compare_union

    common = _marketplace_settings(marketplace, features_dir)
    unified, ids = unified_ids
    gen = train(TrainConfig(model="generative", semantic_ids=str(ids), backbone="hstu",
                            beam_width=40, out_dir=str(tmp_path / "g"), **common))  # fmt: skip
    assert 0.0 < gen.test_metrics["recall@20"] <= 1.0  # it wrote some of the targets
    u, g = unified.model_path, gen.model_path
    assert main(["evaluate", "--model", str(u), "--union", str(g), "-k", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    # The share is chosen on validation from the grid; the baseline is the unified model alone.
    assert set(out["valid_recall_by_share"]) == {"12", "25", "50"}
    assert out["share"] in (12, 25, 50)
    assert out["all"]["baseline"] == pytest.approx(unified.test_metrics["recall@100"])
    click = unified.test_metrics["label.click.recall@100"]
    assert out["label.click"]["baseline"] == pytest.approx(click)
    assert "ads.cold" in out and out["ads.cold"]["n"] > 0
    # The model joined with itself, every slot the second list's: the same lists on every user.
    whole = compare_union(u, u, k=40, share=40)
    assert whole["all"]["mean"] == whole["all"]["low"] == whole["all"]["high"] == 0.0
    with pytest.raises(ConfigError, match=r"^share: must lie in 0..40"):
        compare_union(u, g, k=40, share=41)
    with pytest.raises(ConfigError, match=r"^share: choosing it on the validation window"):
        compare_union(u, g, split="valid", k=40)
    assert main(["evaluate", "--model", str(u), "--union", str(g), "--against", str(u)]) == 2
    assert "union: --union and --against are two comparisons" in capsys.readouterr().err


def test_a_generative_model_on_the_unified_transducer_writes_for_the_request(
    marketplace, features_dir: Path, unified_ids, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """With the unified model's transducer the state, and so the ID written, depends on the
    request's label, surface and context: it trains on each target's own, is evaluated on each
    target's own (as saved and reloaded), and serving writes for the request's surface."""
    from candgen.cli import main
    from candgen.models.unified import UnifiedHSTU
    from candgen.serving.generative import GenerativeAds
    from candgen.serving.pipeline import UserContext, written_ads

    common = _marketplace_settings(marketplace, features_dir)
    _, ids = unified_ids
    gen = train(TrainConfig(model="generative", semantic_ids=str(ids), backbone="unified",
                            beam_width=40, out_dir=str(tmp_path / "g"), **common))  # fmt: skip
    assert 0.0 < gen.test_metrics["recall@20"] <= 1.0
    assert "surface.search.recall@20" in gen.test_metrics  # ranked per request, as the unified
    loaded = load_model(gen.model_path)
    model = loaded.model
    assert isinstance(model, GenerativeRetriever) and model.contextual
    assert isinstance(model.encoder, UnifiedHSTU) and model.encoder.query_tower is not None
    assert loaded.header.query_text_dim > 0 and loaded.header.has_context_items
    # The saved model evaluates as the run did: the same per-target queries and lists.
    assert main(["evaluate", "--model", str(gen.model_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["recall@20"] == pytest.approx(gen.test_metrics["recall@20"])
    # One user state, asked for by each surface: different queries, different IDs written.
    state = torch.randn(1, model.encoder.dim).expand(3, -1)
    with torch.no_grad():
        queries = model.context_queries(state, {"scenarios": torch.tensor([1, 2, 3])})
    assert not torch.allclose(queries[0], queries[1])
    lists = model.generate(queries, 40)[0]
    assert not (np.array_equal(lists[0], lists[1]) and np.array_equal(lists[1], lists[2]))
    # Serving passes the request's surface to it.
    generative = GenerativeAds.load(gen.model_path, loaded.header.item_ids[1:], depth=40)
    known = [int(i) for i in loaded.header.item_ids[1:6]]
    users = [UserContext(history=known)] * 3
    surfaces = ["home", "search", "related"]
    written = written_ads(generative, users, surfaces, [None] * 3, [None] * 3)
    again = written_ads(generative, users, ["home"] * 3, [None] * 3, [None] * 3)
    assert all(w is not None for w in (*written, *again))
    assert np.array_equal(again[0][0], again[1][0])  # type: ignore[index]
    assert not all(
        np.array_equal(written[0][0], w[0])  # type: ignore[index]
        for w in written[1:]
    )
    # ... and the request's context, as the model was trained and evaluated.
    reader = generative.retriever
    assert reader.query_text_dim == loaded.header.query_text_dim and reader.reads_context_items
    query = np.random.default_rng(0).normal(size=reader.query_text_dim).astype(np.float32)
    viewed = int(loaded.header.item_ids[7])
    plain = written_ads(generative, users[:2], ["search", "related"], [None] * 2, [None] * 2)
    given = written_ads(generative, users[:2], ["search", "related"], [query, None], [None, viewed])
    for before, after in zip(plain, given, strict=True):
        assert before is not None and after is not None
        assert not np.array_equal(before[0], after[0])
