"""Long- and short-term interests (issue 6): the dense all-action objective, the long-term
summaries and their point-in-time use in training, the fusion in the unified model, and the
request-time fusion of the short-term sequence with the request's real-time items."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from candgen.cli import main
from candgen.data.batches import training_windows
from candgen.data.sequences import SECONDS_PER_DAY, load_marketplace, pq_metadata
from candgen.errors import CandgenError, ConfigError
from candgen.features.long_term import summarise
from candgen.models.factory import load_model
from candgen.models.retriever import Retriever
from candgen.models.unified import UnifiedHSTU
from candgen.serving.pipeline import user_context, user_vector
from candgen.training.config import TrainConfig
from candgen.training.long_term import SummariserConfig, build_long_term_features
from candgen.training.trainer import train
from candgen.vocab import LONG_TERM_TABLE

EVAL_DAYS = 2


@pytest.fixture(scope="module")
def summarised(marketplace, features_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """A copy of the session's feature tables with long-term summaries written into it."""
    out = tmp_path_factory.mktemp("lt") / "features"
    shutil.copytree(features_dir, out)
    config = SummariserConfig(eval_days=EVAL_DAYS, epochs=3, out_dir=str(out.parent / "summariser"))
    config = config.train_config(marketplace.out_dir, progress=False)
    build_long_term_features(config, out)
    return out


def test_all_action_targets_are_actions_of_the_next_days(marketplace) -> None:  # type: ignore[no-untyped-def]
    data = load_marketplace(marketplace.out_dir, eval_days=EVAL_DAYS)
    windows = training_windows(data, max_len=30, all_action_days=1.0)
    rng = np.random.default_rng(0)
    targets = np.stack([windows.all_action_targets(np.arange(len(windows)), rng)
                        for _ in range(5)])  # fmt: skip
    assert (targets > 0).sum() > 0.5 * (windows.targets > 0).sum() * 5
    drawn_beyond_next = 0
    for w, row in enumerate(windows.user_rows[:200]):
        seq, secs = data.train[row], data.train_times[row]
        for j in np.flatnonzero(windows.inputs[w] > 0):
            t = windows.times[w, j]
            future = set(seq[(secs > t) & (secs <= t + SECONDS_PER_DAY)].tolist())
            for draw in targets[:, w, j]:
                assert (draw == 0 and not future) or draw in future, (w, j, draw)
                drawn_beyond_next += int(draw != windows.targets[w, j] and draw > 0)
    assert drawn_beyond_next > 0  # not just the next item: the whole window is a target


def test_all_action_needs_timestamps_and_is_not_the_unified_objective() -> None:
    from candgen.data.sequences import load_planted

    with pytest.raises(ConfigError, match=r"^objective: all_action needs timestamps"):
        training_windows(load_planted(seed=1), max_len=10, all_action_days=7.0)
    with pytest.raises(ConfigError, match=r"^objective: all_action trains a long-term"):
        TrainConfig(model="unified", objective="all_action")
    with pytest.raises(ConfigError, match=r"^all_action_days: must be > 0"):
        TrainConfig(all_action_days=0)
    with pytest.raises(ConfigError, match=r"^short_term: only the unified model"):
        TrainConfig(model="hstu", short_term=False)


def test_summaries_cover_every_snapshot_and_carry_the_training_cutoff(
    marketplace,
    summarised: Path,  # type: ignore[no-untyped-def]
) -> None:
    table = pd.read_parquet(summarised / f"{LONG_TERM_TABLE}.parquet")
    snapshots = pd.read_parquet(summarised / "user_long_term.parquet")
    assert 0.9 * len(snapshots) <= len(table) <= len(snapshots)
    merged = table.merge(snapshots, on=["user_id", "event_timestamp"], how="left")
    assert merged["long_item_ids"].notna().all()  # stamped exactly as the snapshot it summarises
    assert {len(v) for v in table["long_term_embedding"]} == {64}
    data = load_marketplace(marketplace.out_dir, summarised, eval_days=EVAL_DAYS)
    assert pq_metadata(summarised / f"{LONG_TERM_TABLE}.parquet")["trained_before"] == (
        data.train_cutoff
    )
    manifest = pd.read_json(summarised / "manifest.json", typ="series")
    assert manifest["long_term"]["trained_before"] == data.train_cutoff
    assert data.long_term is not None and data.long_term.dim == 64
    assert data.feature_service == "user_features_v2,ad_features_v1"


def test_a_summary_trained_past_the_models_cutoff_is_refused(marketplace, summarised: Path) -> None:  # type: ignore[no-untyped-def]
    # A model with longer evaluation windows has an earlier cutoff than the summariser's.
    with pytest.raises(CandgenError, match=r"rebuild the long-term features with the same "
                       r"eval_days"):  # fmt: skip
        load_marketplace(marketplace.out_dir, summarised, eval_days=EVAL_DAYS + 1)


def test_each_training_position_reads_the_summary_published_before_its_day(
    marketplace,
    summarised: Path,  # type: ignore[no-untyped-def]
) -> None:
    data = load_marketplace(marketplace.out_dir, summarised, eval_days=EVAL_DAYS)
    lt = data.long_term
    windows = training_windows(data, max_len=30)
    rows, times = windows.long_term_rows, windows.times
    assert rows is not None and times is not None
    real = windows.inputs > 0
    assert (rows[real] > 0).mean() > 0.3  # three training days: the first has no summary yet
    for w, user in enumerate(windows.user_rows[:300]):
        lo, hi = lt.user_offsets[user], lt.user_offsets[user + 1]
        for j in np.flatnonzero(real[w]):
            day_start = np.floor(times[w, j] / SECONDS_PER_DAY) * SECONDS_PER_DAY
            published = np.flatnonzero(lt.times[lo:hi] < day_start)
            expected = lo + 1 + published[-1] if len(published) else 0
            assert rows[w, j] == expected
    # The evaluation window's users read the summary published before the window began.
    start = pd.Timestamp(data.train_cutoff).timestamp()
    for row in data.valid.long_term_rows[:50]:
        assert row == 0 or lt.times[row - 1] < start


def test_the_unified_model_fuses_the_long_term_embedding(
    marketplace,
    summarised: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    for variant in ({}, {"short_term": False}):
        out = tmp_path / ("short" if variant else "both")
        config = TrainConfig(dataset="marketplace", model="unified", epochs=2, eval_every=2,
                             data_dir=str(marketplace.out_dir), features_dir=str(summarised),
                             eval_days=EVAL_DAYS, max_len=20, batch_size=64, progress=False,
                             track=False, out_dir=str(out), **variant)  # fmt: skip
        result = train(config)
        assert "label.click.recall@100" in result.test_metrics
        model, saved = load_model(out / "model.pt")
        assert isinstance(model, UnifiedHSTU) and saved.long_term_dim == 64
        assert model.short_term == (not variant)
        items = torch.tensor([[0, 0, 3, 7], [1, 4, 9, 12]])
        lt = torch.randn(2, 64)
        with torch.no_grad():
            fused = model.user_embedding({"items": items, "long_term": lt})
            other = model.user_embedding({"items": items, "long_term": -lt})
            reordered = model.user_embedding({"items": items.flip(0), "long_term": lt})
        assert not torch.allclose(fused, other)
        # Without short-term features the recent items do not move the query at all.
        assert torch.allclose(fused, reordered, atol=1e-6) == bool(variant)


def test_leaving_out_the_short_term_sequence_needs_long_term_embeddings(
    marketplace,
    features_dir: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    config = TrainConfig(dataset="marketplace", model="unified", short_term=False, epochs=1,
                         data_dir=str(marketplace.out_dir), features_dir=str(features_dir),
                         eval_days=EVAL_DAYS, progress=False, track=False,
                         out_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(ConfigError, match=r"^short_term: leaving out the short-term sequence"):
        train(config)


class _Features:
    def __init__(self, row: dict[str, Any] | None) -> None:
        self.row = row

    def lookup(self, service: str, entity: str, key: int) -> dict[str, Any] | None:
        assert service == "user_serving_v3"
        return self.row


def test_request_time_fusion_of_short_and_long_term_features(
    summarised: Path,
    marketplace,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    config = TrainConfig(dataset="marketplace", model="unified", epochs=2, eval_every=2,
                         data_dir=str(marketplace.out_dir), features_dir=str(summarised),
                         eval_days=EVAL_DAYS, max_len=20, batch_size=64, progress=False,
                         track=False, out_dir=str(tmp_path))  # fmt: skip
    train(config)
    model, saved = load_model(tmp_path / "model.pt")
    retriever = Retriever(model, saved.item_ids, max_len=20)
    table = pd.read_parquet(summarised / f"{LONG_TERM_TABLE}.parquet")
    stored = {"recent_item_ids": [int(x) for x in saved.item_ids[1:4]],
              "recent_timestamps": [100, 200, 300], "category_affinity": None,
              "long_term_embedding": list(table["long_term_embedding"].iloc[0]),
              "engagements_total": 40, "ad_clicks_total": 2}  # fmt: skip
    recent = [int(saved.item_ids[10])]
    context = user_context(_Features(stored), 1, recent)
    # The stored sequence, then the request's real-time items (stamped at the newest time).
    assert context.history == [*stored["recent_item_ids"], *recent]
    assert context.times == [100.0, 200.0, 300.0, 300.0]
    assert context.activity == 40 + 2 + 1 and len(context.long_term) == 64
    fused = user_vector(retriever, context, "home")
    expected = retriever.user_vectors([context.history], [context.times], ["home"],
                                      [context.long_term])[0]  # fmt: skip
    assert np.allclose(fused, expected, atol=1e-6)
    without_recent = user_vector(retriever, user_context(_Features(stored), 1), "home")
    without_long = user_vector(retriever, user_context(_Features(
        dict(stored, long_term_embedding=None)), 1, recent), "home")  # fmt: skip
    assert not np.allclose(fused, without_recent) and not np.allclose(fused, without_long)
    with pytest.raises(CandgenError, match=r"^long_term\[0\]: 3 values, but the model fuses a "
                       r"64-d"):  # fmt: skip
        retriever.user_vectors([context.history], scenarios=["home"], long_term=[[1.0, 2.0, 3.0]])


def test_the_long_term_command_summarises_and_rejects_bad_input(
    marketplace,
    summarised: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    features = tmp_path / "features"
    shutil.copytree(summarised, features)
    (features / f"{LONG_TERM_TABLE}.parquet").unlink()
    summariser = summarised.parent / "summariser" / "model.pt"
    assert main(["features", "long-term", "--model", str(summariser), "--features-dir",
                 str(features), "--quiet"]) == 0  # fmt: skip
    assert '"rows"' in capsys.readouterr().out
    assert len(pd.read_parquet(features / f"{LONG_TERM_TABLE}.parquet")) > 0
    assert main(["features", "long-term", "--data", str(marketplace.out_dir), "--eval-days", "0",
                 "--features-dir", str(features)]) == 2  # fmt: skip
    assert "eval_days: must be > 0" in capsys.readouterr().err
    assert main(["features", "long-term", "--model", str(tmp_path / "none.pt"),
                 "--features-dir", str(features)]) == 2  # fmt: skip
    assert "no such model file" in capsys.readouterr().err


def test_summarise_needs_a_time_split_summariser(tmp_path: Path, summarised: Path) -> None:
    from candgen.data.sequences import load_planted

    train(TrainConfig(dataset="planted", model="hstu", epochs=1, max_len=10, progress=False,
                      track=False, out_dir=str(tmp_path)), load_planted(seed=1))  # fmt: skip
    with pytest.raises(CandgenError, match=r"^model: .* was not trained on a time-split"):
        summarise(tmp_path / "model.pt", summarised)


@pytest.mark.parametrize("variant", [{}, {"short_term": False}, {"long_term": False},
                                     {"scenario_adaptive": False}])  # fmt: skip
def test_every_parameter_trains_so_ddp_can_reduce(marketplace, summarised: Path,  # type: ignore[no-untyped-def]
                                                   variant: dict) -> None:  # fmt: skip
    """DDP stalls on a parameter that gets no gradient (the ablation trains with 2 processes)."""
    from candgen.data.batches import make_batch
    from candgen.models.factory import build_model
    from candgen.training.trainer import _TrainingLoss, long_term_dim

    config = TrainConfig(dataset="marketplace", model="unified", max_len=20, **variant)
    data = load_marketplace(marketplace.out_dir, summarised, eval_days=EVAL_DAYS)
    model = build_model(config, data.num_items, torch.from_numpy(data.item_attributes),
                        torch.from_numpy(data.item_text), data.user_feature_cardinalities,
                        has_timestamps=True, has_labels=True,
                        cold_items=torch.from_numpy(data.cold_ads),
                        long_term_dim=long_term_dim(config, data))  # fmt: skip
    windows = training_windows(data, config.max_len)
    idx = np.arange(64)
    batch = make_batch(data, windows.inputs[idx], windows.times[idx], windows.user_rows[idx],
                       torch.device("cpu"), windows.target_labels[idx],
                       windows.target_surfaces[idx], windows.long_term_rows[idx])  # fmt: skip
    log_pop = torch.full((data.num_items + 1,), -float(np.log(data.num_items)))
    loss = _TrainingLoss(model, config, log_pop)(batch, torch.from_numpy(windows.targets[idx]),
                                                 torch.Generator().manual_seed(0))  # fmt: skip
    loss.backward()
    idle = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert idle == []
