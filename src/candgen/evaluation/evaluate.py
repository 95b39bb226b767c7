"""Evaluating a trained model (or the popularity baseline) on a data set's eval split."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from candgen.data.batches import eval_batches
from candgen.data.config import DataConfig
from candgen.data.sequences import EvalSet, SequenceData, label_codes, load_data, surface_codes
from candgen.data.tensors import Batch
from candgen.errors import ConfigError
from candgen.evaluation.metrics import (
    KS,
    coverage,
    paired_difference,
    ranking_metrics,
    sampled_ranks,
    target_ranks,
    union_lists,
    user_recall,
)
from candgen.models.base import RetrievalModel
from candgen.models.generative import GenerativeRetriever
from candgen.models.retriever import chunked_topk

PROTOCOLS = ("full", "sampled100")


@torch.no_grad()
def user_queries(
    model: RetrievalModel,
    data: SequenceData,
    eval_set: EvalSet,
    max_len: int,
    batch_size: int = 512,
) -> torch.Tensor:
    """(M, D) user embeddings after each evaluated user's history (call in eval mode)."""
    device = next(model.parameters()).device
    out = [
        model.user_embedding(batch)
        for _, batch in eval_batches(data, eval_set, max_len, batch_size, device)
    ]
    return torch.cat(out) if out else torch.zeros(0, 1, device=device)


def evaluate_vectors(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    data: SequenceData,
    eval_set: EvalSet,
    protocol: str = "full",
    ks: tuple[int, ...] = KS,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics of precomputed user queries against an item table.

    With the full protocol, the metrics are also split by target label and by surface (where the
    data has more than one), and item coverage of the top-10 and top-100 lists is reported.
    Keys look like ``hr@10``, ``label.click.recall@50``, ``surface.search.ndcg@10``.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError("protocol", f"{protocol!r} is not one of {PROTOCOLS}")
    if len(eval_set) == 0:
        raise ConfigError("eval set", "no users to evaluate")
    ks = _cutoffs(ks, 100 if protocol == "sampled100" else data.num_items)
    if protocol == "sampled100":
        interacted = [
            np.concatenate([h, eval_set.target_item[eval_set.target_user == i]])
            for i, h in enumerate(eval_set.histories)
        ]
        first = np.unique(eval_set.target_user, return_index=True)[1]
        ranks = sampled_ranks(
            queries, item_table, eval_set.target_item[first], interacted, seed=seed
        )
        return ranking_metrics(ranks, np.arange(len(ranks)), ks)
    topk = chunked_topk(queries, item_table, max(ks), eval_set.histories).numpy()
    ranks = target_ranks(topk, eval_set.target_user, eval_set.target_item)
    return _full_metrics(ranks, topk, data, eval_set, ks)


def generated_topk(
    model: GenerativeRetriever,
    queries: torch.Tensor,
    histories: list[np.ndarray],
    k: int = 0,
    chunk: int = 512,
) -> np.ndarray:
    """(M, max(beam_width, k)) the items a generative model writes for each user state, best
    first, less the user's history (-1 fills a list that comes up short), as ``chunked_topk``
    ranks a dense model's. The search keeps the list's length plus the longest history of its
    chunk of users, so that dropping the history still leaves a full list (users go in order of
    history length, so a chunk's longest is near its shortest). A model with a dense head then
    orders each list by it: every user's candidates are the same number."""
    if len(histories) != queries.shape[0]:
        raise ConfigError("histories", f"{len(histories)} lists for {queries.shape[0]} queries")
    width = max(model.beam_width, k)
    out = np.full((queries.shape[0], width), -1, np.int64)
    trie = model.trie()
    by_length = np.argsort([len(h) for h in histories], kind="stable")
    for start in range(0, len(by_length), chunk):
        rows = by_length[start : start + chunk]
        longest = max(len(histories[r]) for r in rows)
        items, _ = model.generate(queries[torch.from_numpy(rows)], width + longest, trie)
        for row, found in zip(rows.tolist(), items, strict=True):
            kept = found[(found > 0) & ~np.isin(found, histories[row])][:width]
            out[row, : len(kept)] = kept
        if model.dense_weight:
            out[rows], _ = model.dense_order(queries[torch.from_numpy(rows)], out[rows])
    return out


def _generated_per_request(
    model: GenerativeRetriever,
    queries: torch.Tensor,
    users: np.ndarray,
    histories: list[np.ndarray],
    k: int,
) -> np.ndarray:
    """(T, k) ``generated_topk`` for T targets' queries, searched once per distinct request:
    the targets of one request (the same user and the same query) share their list, and the
    beam search costs far more than a dense model's scoring."""
    # float64 holds every int64 user id below 2**53 and every float32 query exactly
    keys = np.concatenate(
        [users.astype(np.float64)[:, None], queries.cpu().numpy().astype(np.float64)], axis=1
    )
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    lists = generated_topk(
        model, queries[torch.from_numpy(first)], [histories[i] for i in first], k
    )
    return lists[inverse.reshape(-1), :k]


def _cutoffs(ks: tuple[int, ...], most: int) -> tuple[int, ...]:
    """The cut-offs a ranking of ``most`` candidates can answer (K = 200 needs 200 items)."""
    return tuple(k for k in ks if k <= most) or (most,)


def _full_metrics(
    ranks: np.ndarray,
    topk: np.ndarray,
    data: SequenceData,
    eval_set: EvalSet,
    ks: tuple[int, ...],
) -> dict[str, float]:
    """Ranking metrics of the targets' ranks, their splits by label and surface, the split of
    ad targets into cold-start ads (no training interaction) and warm ones, and the item
    coverage of the top-K lists."""
    out = ranking_metrics(ranks, eval_set.target_user, ks)
    out["coverage@10"] = coverage(topk, data.num_items, 10)
    out["coverage@100"] = coverage(topk, data.num_items, min(100, topk.shape[1]))
    groups = [("label", eval_set.target_label)]
    if eval_set.target_surface is not None:
        groups.append(("surface", eval_set.target_surface))
    for kind, values in groups:
        names = sorted(set(values.tolist()))
        if len(names) < 2:
            continue
        for name in names:
            sel = values == name
            part = ranking_metrics(ranks[sel], eval_set.target_user[sel], ks)
            out.update({f"{kind}.{name}.{key}": v for key, v in part.items()})
    if data.ad_items is not None:
        is_ad, cold = data.ad_items[eval_set.target_item], data.cold_ads[eval_set.target_item]
        for name, chosen in (("cold", is_ad & cold), ("warm", is_ad & ~cold)):
            part = ranking_metrics(ranks[chosen], eval_set.target_user[chosen], ks)
            out.update({f"ads.{name}.{key}": v for key, v in part.items()})
    return out


@torch.no_grad()
def evaluate_contextual(
    model: RetrievalModel,
    data: SequenceData,
    eval_set: EvalSet,
    max_len: int,
    ks: tuple[int, ...] = KS,
    context: bool = True,
) -> dict[str, float]:
    """Full-ranking metrics of a model whose query depends on the request: each target is
    ranked by the query for its own label on its own surface, with its own logged search query
    and context item (what serving asks for; ``context=False`` leaves out the query and the
    context item, for a paired comparison), then the metrics aggregate per user as for any
    model. Coverage counts every such list.
    """
    # A generative model ranks only what its beam writes, as for a model without context.
    most = model.beam_width if isinstance(model, GenerativeRetriever) else data.num_items
    ks = _cutoffs(ks, most)
    ranks, lists = _contextual_ranks(model, data, eval_set, max_len, max(ks), context)
    return _full_metrics(ranks, lists, data, eval_set, ks)


def target_context(
    data: SequenceData, eval_set: EvalSet, chosen: np.ndarray, context: bool, device: torch.device
) -> Batch:
    """The request context of the ``chosen`` targets: label, surface and, with ``context``,
    the logged search query (its text embedding) and context item."""
    assert eval_set.target_surface is not None
    out: Batch = {
        "labels": torch.from_numpy(label_codes(eval_set.target_label[chosen])).to(device),
        "scenarios": torch.from_numpy(surface_codes(eval_set.target_surface[chosen])).to(device),
    }
    if not context:
        return out
    if eval_set.target_query is not None and data.query_embeddings is not None:
        text = data.query_embeddings[eval_set.target_query[chosen]]
        out["query_text"] = torch.from_numpy(text).to(device)
    if eval_set.target_context is not None:
        out["context_items"] = torch.from_numpy(eval_set.target_context[chosen]).to(device)
    return out


def _contextual_ranks(
    model: RetrievalModel,
    data: SequenceData,
    eval_set: EvalSet,
    max_len: int,
    k: int,
    context: bool = True,
    chunk: int = 4_096,
) -> tuple[np.ndarray, np.ndarray]:
    """Each target's rank in the top ``k`` of its own request's query (``k`` where absent),
    and every such top-``k`` list. The user's history is encoded once; each target then gets
    its own query from its label, surface and (with ``context``) query text and context item."""
    device = next(model.parameters()).device
    states = torch.cat(
        [
            model.user_states(batch)[:, -1]
            for _, batch in eval_batches(data, eval_set, max_len, 512, device)
        ]
    )
    table = None if isinstance(model, GenerativeRetriever) else model.item_table()
    n = len(eval_set.target_item)
    ranks = np.zeros(n, dtype=np.int64)
    lists = []
    for start in range(0, n, chunk):
        chosen = np.arange(start, min(start + chunk, n))
        users = eval_set.target_user[chosen]
        queries = model.context_queries(
            states[torch.from_numpy(users).to(device)],
            target_context(data, eval_set, chosen, context, device),
        )
        histories = [eval_set.histories[u] for u in users]
        if isinstance(model, GenerativeRetriever):
            topk = _generated_per_request(model, queries, users, histories, k)
        else:
            assert table is not None
            topk = chunked_topk(queries, table, k, histories).numpy()
        ranks[chosen] = target_ranks(topk, np.arange(len(chosen)), eval_set.target_item[chosen])
        lists.append(topk)
    return ranks, np.concatenate(lists) if lists else np.zeros((0, k), np.int64)


@torch.no_grad()
def target_lists(
    model: RetrievalModel,
    data: SequenceData,
    split: str,
    max_len: int,
    k: int,
    context: bool = True,
) -> np.ndarray:
    """(T, k) the top ``k`` each target of ``split`` is ranked in, as ``evaluate_model`` ranks
    it (a contextual model by the query for the target's own request: label, surface and, with
    ``context``, query and context item; any other model by its user's list; a generative model
    by what it writes, -1 where that comes up short)."""
    eval_set = _eval_set(data, split)
    with _eval_mode(model):
        if model.contextual and eval_set.target_surface is not None:
            return _contextual_ranks(model, data, eval_set, max_len, k, context)[1]
        queries = user_queries(model, data, eval_set, max_len)
        if isinstance(model, GenerativeRetriever):
            topk = generated_topk(model, queries, eval_set.histories, k)[:, :k]
        else:
            topk = chunked_topk(queries, model.item_table(), k, eval_set.histories).numpy()
    lists: np.ndarray = topk[eval_set.target_user]
    return lists


def full_ranks(
    model: RetrievalModel,
    data: SequenceData,
    split: str,
    max_len: int,
    k: int,
    context: bool = True,
) -> np.ndarray:
    """(T,) each target's 0-based rank in a full ranking of the catalogue cut at ``k`` (``k``
    where absent), ranked as ``evaluate_model`` ranks it (``target_lists``)."""
    lists = target_lists(model, data, split, max_len, k, context)
    return _ranks_in(lists, _eval_set(data, split))


def _ranks_in(lists: np.ndarray, targets: EvalSet) -> np.ndarray:
    """(T,) each target's rank in its own list (``target_lists``' rows; the length where
    absent)."""
    return target_ranks(lists, np.arange(len(lists)), targets.target_item)


def _same_data(paths: Sequence[Path | str]) -> list[Any]:
    """The saved models at ``paths``, checked to be trained on the same data, evaluation windows
    and (full) protocol, so that their targets pair up.

    Raises:
        ConfigError: a field on which they differ, named.
    """
    from candgen.models.factory import load_model

    runs = [load_model(Path(path)) for path in paths]
    ours_h = runs[0].header
    for run in runs[1:]:
        theirs_h = run.header
        for name in ("dataset", "data_dir", "eval_days"):
            ours, theirs = getattr(ours_h.data, name), getattr(theirs_h.data, name)
            if ours != theirs:
                raise ConfigError(
                    name, f"the models were trained on different data: {ours!r} vs {theirs!r}"
                )
        if ours_h.protocol != theirs_h.protocol:
            raise ConfigError(
                "protocol",
                f"the models were selected with different protocols: "
                f"{ours_h.protocol!r} vs {theirs_h.protocol!r}",
            )
    if ours_h.protocol != "full":
        raise ConfigError("protocol", "paired comparisons need the full protocol")
    return runs


def _data_of(runs: Sequence[Any]) -> list[SequenceData]:
    """Each run's data (each model reads its own features: a summary one model fuses and the
    other ignores); the same data is loaded once."""
    loaded: dict[DataConfig, SequenceData] = {}
    for run in runs:
        key = run.header.data
        loaded[key] = loaded.get(key) or load_data(key, seed=run.header.seed)
    return [loaded[run.header.data] for run in runs]


def _same_targets(datas: Sequence[SequenceData], split: str) -> EvalSet:
    targets = _eval_set(datas[0], split)
    for data in datas[1:]:
        if not np.array_equal(targets.target_item, _eval_set(data, split).target_item):
            raise ConfigError(
                "data_dir", "the two models' evaluation windows hold different targets"
            )
    return targets


def _paired_groups(
    targets: EvalSet, data: SequenceData, ours: np.ndarray, theirs: np.ndarray, k: int
) -> dict[str, Any]:
    """Recall@K of two rankings of the same targets (their ranks), paired per user: overall,
    per label, per surface, per label on each surface, and on cold-start and warm ad targets."""
    groups: dict[str, np.ndarray] = {"all": np.ones(len(targets.target_item), dtype=bool)}
    for kind, values in (("label", targets.target_label), ("surface", targets.target_surface)):
        if values is not None and len(set(values.tolist())) > 1:
            groups.update({f"{kind}.{v}": values == v for v in sorted(set(values.tolist()))})
    if targets.target_surface is not None and len(set(targets.target_surface.tolist())) > 1:
        # Each label on each surface (what the request's context is worth differs by both).
        for surface in sorted(set(targets.target_surface.tolist())):
            for label in sorted(set(targets.target_label.tolist())):
                chosen = (targets.target_surface == surface) & (targets.target_label == label)
                if chosen.any():
                    groups[f"surface.{surface}.label.{label}"] = chosen
    if data.ad_items is not None:
        is_ad, cold = data.ad_items[targets.target_item], data.cold_ads[targets.target_item]
        for name, chosen in (("cold", is_ad & cold), ("warm", is_ad & ~cold)):
            if chosen.any():
                groups[f"ads.{name}"] = chosen
    out: dict[str, Any] = {}
    n_users = len(targets)
    for name, chosen in groups.items():
        users = targets.target_user[chosen]
        a, b = (user_recall(r[chosen], users, k, n_users) for r in (ours, theirs))
        out[name] = {
            "model": float(np.nanmean(a)),
            "baseline": float(np.nanmean(b)),
            **paired_difference(a, b),
        }
    return out


def compare_saved_models(
    model_path: Path | str,
    baseline_path: Path | str,
    split: str = "test",
    k: int = 100,
    baseline_context: bool = True,
) -> dict[str, Any]:
    """Recall@K of one ``model.pt`` minus another's, per user, on the same evaluation window:
    overall and per target label (and surface), each with a 95% paired bootstrap interval and
    the users each model wins (``candgen.evaluation.metrics.paired_difference``); per label on
    each surface too (``surface.search.label.click``), and on cold-start and warm ads. With
    ``baseline_context=False`` the baseline ranks without the requests' search query and
    context item: against the same file, what the context is worth.

    Raises:
        ConfigError: the two models were not trained on the same data and split (named field).
    """
    if k < 1:
        raise ConfigError("k", f"must be >= 1, got {k}")
    runs = _same_data([model_path, baseline_path])
    datas = _data_of(runs)
    targets = _same_targets(datas, split)
    ranks = [
        full_ranks(m, data, split, h.model.max_len, min(k, data.num_items), context)
        for (m, h), data, context in zip(runs, datas, (True, baseline_context), strict=True)
    ]
    return {
        "model": str(model_path),
        "baseline": str(baseline_path),
        "split": split,
        "k": k,
        "baseline_context": baseline_context,
        **_paired_groups(targets, datas[0], ranks[0], ranks[1], k),
    }


UNION_SHARES = (0.125, 0.25, 0.5)  # the generative list's share of K that validation chooses from


def compare_union(
    model_path: Path | str,
    generative_path: Path | str,
    split: str = "test",
    k: int = 200,
    share: int = 0,
) -> dict[str, Any]:
    """What a second generator adds to a model's candidates at the same budget: recall@K of
    the model's top ``K - s`` joined with ``generative_path``'s top ``s`` (``union_lists``: a
    quota of ``s`` slots, duplicates refilled from the model's list) minus the model's top K
    alone, paired per user (the groups of ``compare_saved_models``, cold-start ads among them).

    Args:
        share: ``s``; 0 chooses it on the validation window (the best overall recall@K of
            ``UNION_SHARES`` of K), never on the test window.

    Raises:
        ConfigError: k or share out of range, or models trained on different data (named).
    """
    if k < 1:
        raise ConfigError("k", f"must be >= 1, got {k}")
    if not 0 <= share <= k:
        raise ConfigError("share", f"must lie in 0..{k} (0: chosen on validation), got {share}")
    if share == 0 and split == "valid":
        raise ConfigError(
            "share", "choosing it on the validation window and reporting that window overfits it"
        )
    runs = _same_data([model_path, generative_path])
    datas = _data_of(runs)

    def lists(on: str) -> tuple[EvalSet, np.ndarray, np.ndarray]:
        targets = _same_targets(datas, on)
        first, second = (
            target_lists(m, data, on, h.model.max_len, min(k, data.num_items))
            for (m, h), data in zip(runs, datas, strict=True)
        )
        return targets, first, second

    chosen_on: dict[str, float] = {}
    if share == 0:
        targets, first, second = lists("valid")
        users = len(targets)
        for s in sorted({max(1, round(f * k)) for f in UNION_SHARES}):
            joined = _ranks_in(union_lists(first, second, s), targets)
            recall = user_recall(joined, targets.target_user, k, users)
            chosen_on[str(s)] = float(np.nanmean(recall))
        share = int(max(chosen_on, key=lambda s: (chosen_on[s], -int(s))))
    targets, first, second = lists(split)
    alone = _ranks_in(first, targets)
    joined = _ranks_in(union_lists(first, second, share), targets)
    return {
        "model": str(model_path),
        "generative": str(generative_path),
        "split": split,
        "k": k,
        "share": share,
        "valid_recall_by_share": chosen_on,
        **_paired_groups(targets, datas[0], joined, alone, k),
    }


@contextmanager
def _eval_mode(model: RetrievalModel) -> Iterator[None]:
    """No dropout inside; the model's own mode again after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _eval_set(data: SequenceData, split: str) -> EvalSet:
    if split not in ("valid", "test"):
        raise ConfigError("split", f"must be 'valid' or 'test', got {split!r}")
    return data.test if split == "test" else data.valid


def evaluate_model(
    model: RetrievalModel,
    data: SequenceData,
    split: str = "test",
    protocol: str = "full",
    max_len: int = 50,
    seed: int = 0,
    context: bool = True,
) -> dict[str, float]:
    """Metrics of ``model`` (in eval mode: no dropout) on ``data.valid`` or ``data.test``
    (``context=False``: a contextual model ranks without the requests' query and context
    item)."""
    eval_set = _eval_set(data, split)
    with _eval_mode(model):
        if model.contextual and protocol == "full" and eval_set.target_surface is not None:
            return evaluate_contextual(model, data, eval_set, max_len, context=context)
        queries = user_queries(model, data, eval_set, max_len)
        if isinstance(model, GenerativeRetriever):
            if protocol != "full":
                raise ConfigError(
                    "protocol", "a generative model retrieves from the whole catalogue: use full"
                )
            topk = generated_topk(model, queries, eval_set.histories)
            ranks = target_ranks(topk, eval_set.target_user, eval_set.target_item)
            return _full_metrics(ranks, topk, data, eval_set, _cutoffs(KS, topk.shape[1]))
        table = model.item_table()
    return evaluate_vectors(queries, table, data, eval_set, protocol, seed=seed)


def evaluate_popularity(
    data: SequenceData, split: str = "test", protocol: str = "full", seed: int = 0
) -> dict[str, float]:
    """The most-popular baseline: every user gets the training-popularity ranking."""
    eval_set = _eval_set(data, split)
    pop = torch.from_numpy(data.train_popularity().astype(np.float32))[:, None]
    # A small id-based tie-break keeps the ranking deterministic among equally popular items.
    pop = pop + torch.linspace(0, 1e-3, len(pop))[:, None]
    queries = torch.ones(len(eval_set), 1)
    return evaluate_vectors(queries, pop, data, eval_set, protocol, seed=seed)


def evaluate_saved_model(
    model_path: Path | str,
    split: str = "test",
    protocol: str = "",
    data_dir: str = "",
    features_dir: str = "",
    context: bool = True,
) -> dict[str, Any]:
    """A ``model.pt`` and the popularity baseline on the data it was trained on.

    Args:
        protocol: ``full`` or ``sampled100`` (default: the training config's).
        data_dir, features_dir: where that data sits now, when it has moved since training
            (another pod of a pipeline); default: the paths in the training config.
        context: rank with each request's search query and context item (False: without).

    Returns:
        ``{"split", "protocol", "primary_metric", "model": {...}, "popularity": {...}}``.
    """
    import dataclasses

    from candgen.models.factory import load_model

    model, header = load_model(Path(model_path))
    moved: dict[str, Any] = {
        k: v for k, v in (("data_dir", data_dir), ("features_dir", features_dir)) if v
    }
    data = load_data(dataclasses.replace(header.data, **moved), seed=header.seed)
    protocol = protocol or header.protocol
    seed, max_len = header.seed, header.model.max_len
    return {
        "split": split,
        "protocol": protocol,
        "primary_metric": header.primary_metric,
        "context": context,
        "model": evaluate_model(model, data, split, protocol, max_len, seed, context),
        "popularity": evaluate_popularity(data, split, protocol, seed),
    }
