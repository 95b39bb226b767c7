"""The trainer: one function, ``train(config)``, for one process or many (DDP).

Under torchrun (which TorchX's dist.ddp uses) the environment names the rank and world size;
gradients are all-reduced over gloo on CPUs or nccl on GPUs. Each process takes its share of every
global batch, so one and two processes take the same number of steps of the same global size.
Rank 0 validates, writes checkpoints and logs to MLflow.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from candgen.data.batches import make_batch, restrict_targets, training_windows
from candgen.data.sequences import SequenceData, load_data
from candgen.data.tensors import Batch
from candgen.errors import ConfigError
from candgen.evaluation.evaluate import evaluate_model
from candgen.models.base import RetrievalModel
from candgen.models.factory import build_model
from candgen.models.generative import GenerativeRetriever
from candgen.models.losses import full_softmax_loss, sampled_softmax_loss
from candgen.models.retriever import torch_device
from candgen.models.saved import ModelHeader, save_model
from candgen.models.semantic_ids import SemanticIdTable
from candgen.paths import replace_atomically
from candgen.training.config import TrainConfig
from candgen.vocab import LABELS

CHECKPOINT = "checkpoint.pt"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"


@dataclass
class TrainResult:
    """What a training run produced (rank 0 holds the evaluation results)."""

    config: TrainConfig
    out_dir: Path
    model_path: Path
    valid_metrics: dict[str, float]
    test_metrics: dict[str, float]
    history: list[dict[str, float]]
    best_epoch: int
    epochs_run: int
    wall_seconds: float
    peak_memory_mb: float
    data_summary: dict[str, int]
    snapshot: str
    feature_service: str | None
    world_size: int = 1
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


def long_term_dim(config: TrainConfig, data: SequenceData) -> int:
    """The width of the long-term embedding the model reads (0: it reads none)."""
    if config.encoder != "unified" or not config.long_term or data.long_term is None:
        if not config.short_term:
            raise ConfigError(
                "short_term",
                "leaving out the short-term sequence needs the "
                "long-term embeddings (candgen features long-term)",
            )
        return 0
    return data.long_term.dim


def request_context(config: TrainConfig, data: SequenceData) -> tuple[int, bool]:
    """What request context the model reads: (the width of the query text embedding, 0 for
    none; whether it reads the context item). Only the unified model (or a generative one on its
    transducer) with ``context`` on reads any, and only what the data logs."""
    if config.encoder != "unified" or not config.context or data.train_surfaces is None:
        return 0, False
    width = 0 if data.query_embeddings is None else int(data.query_embeddings.shape[1])
    return width, data.train_contexts is not None


class _Best(TypedDict):
    """The best validation so far, as the checkpoint keeps it."""

    metric: float
    epoch: int
    state: dict[str, torch.Tensor] | None
    stale: int


class WeightAverage:
    """An exponential moving average of a model's trained parameters: it smooths the noise of
    the last steps out of the weights (Polyak averaging), as a falling rate does, without
    shrinking the steps themselves. It starts at the weights it is given, with no warm-up, so
    a decay near 1 suits runs of many steps.

    Args:
        model: the model whose parameters it follows (by reference).
        decay: how much of the average each update keeps, in [0, 1).
        average: an average to continue (a checkpoint's), one tensor per trained parameter.
    """

    def __init__(
        self, model: nn.Module, decay: float, average: list[torch.Tensor] | None = None
    ) -> None:
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        # a checkpoint's average is of this model: _check_resume compares the model's settings
        start: list[torch.Tensor] = list(self.params) if average is None else average
        self.average = [
            t.detach().clone().to(p.device) for t, p in zip(start, self.params, strict=True)
        ]

    @torch.no_grad()
    def update(self) -> None:
        """Moves the average ``1 - decay`` of the way to the current weights."""
        for mean, param in zip(self.average, self.params, strict=True):
            mean.lerp_(param, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the average inside the block and its trained weights after it."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            for param, mean in zip(self.params, self.average, strict=True):
                param.copy_(mean)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, weights in zip(self.params, trained, strict=True):
                    param.copy_(weights)


class _TrainingLoss(nn.Module):
    """Wraps a model so that DDP sees one forward that returns the loss."""

    log_pop: torch.Tensor  # a buffer (register_buffer), so nn.Module's attribute lookup finds it

    def __init__(self, model: RetrievalModel, config: TrainConfig, log_pop: torch.Tensor):
        super().__init__()
        self.model = model
        self.config = config
        self.register_buffer("log_pop", log_pop, persistent=False)

    def forward(self, batch: Batch, targets: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        queries = self.model(batch)
        keep = targets > 0
        q, pos = queries[keep], targets[keep]
        cfg = self.config
        # Multi-task: each target trains its own label's head, weighted by its label.
        weighted = "labels" in batch
        reduction = "none" if weighted else "mean"
        if isinstance(self.model, GenerativeRetriever):
            loss = self.model.id_loss(q, pos, reduction)
            if self.model.dense_weight:
                loss = loss + self.model.dense_weight * self._full_softmax(q, pos, reduction)
        elif cfg.loss == "full":
            loss = self._full_softmax(q, pos, reduction)
        else:
            loss = sampled_softmax_loss(
                q,
                pos,
                self.model.embed_items,
                num_uniform=cfg.num_negatives,
                num_items=self.model.num_items,
                log_popularity=self.log_pop,
                temperature=self.model.temperature,
                in_batch=cfg.in_batch_negatives,
                generator=gen,
                reduction=reduction,
            )
        if not weighted:
            return loss
        weights = torch.tensor(cfg.label_weights, dtype=loss.dtype, device=loss.device)
        w = weights[batch["labels"][keep]]
        return (w * loss).sum() / w.sum().clamp(min=1e-12)

    def _full_softmax(self, q: torch.Tensor, pos: torch.Tensor, reduction: str) -> torch.Tensor:
        """The softmax over every item's embedding in the scoring space."""
        table = self.model.embed_items(torch.arange(self.model.num_items + 1, device=q.device))
        return full_softmax_loss(q, pos, table, self.model.temperature, reduction=reduction)


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    return torch_device(config.device, "device", local_rank)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _check_resume(saved: dict[str, Any], config: TrainConfig) -> None:
    before = TrainConfig.from_dict(saved["config"])

    def shape(c: TrainConfig) -> dict[str, Any]:
        # the weight average is part of the state a resumed run continues
        return {"dataset": c.dataset, "weight_average": c.weight_average, **c.model_fields()}

    before_shape = shape(before)
    for key, value in shape(config).items():
        if before_shape[key] != value:
            raise ConfigError(
                key,
                f"the checkpoint was trained with {before_shape[key]!r}, not "
                f"{value!r}; use another out_dir or keep the setting",
            )


def train(config: TrainConfig, data: SequenceData | None = None) -> TrainResult:
    """Trains, validates and tests one model; see ``TrainConfig`` for every setting.

    Args:
        config: the run's settings.
        data: the prepared data set (loaded from ``config`` when None).

    Returns:
        The result; ``valid_metrics``/``test_metrics`` are filled on rank 0 only.
    """
    t0 = time.perf_counter()
    rank, world, local_rank = _dist_env()
    device = _device(config, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.batch_size < world:
        raise ConfigError("batch_size", f"{config.batch_size} < {world} processes")

    # The generative model's ID table, read before the data so that a bad file fails fast.
    id_table = SemanticIdTable.load(config.semantic_ids) if config.model == "generative" else None
    data = data if data is not None else load_data(config, seed=config.seed)
    all_action = config.objective == "all_action"
    windows = training_windows(
        data,
        config.max_len,
        config.all_action_days if all_action else 0,
        prefixes=config.examples == "prefixes",
    )
    if set(config.train_labels) != set(LABELS):
        if all_action:
            raise ConfigError(
                "train_labels",
                "the all_action objective trains on every action "
                "in the window; leave train_labels at all labels",
            )
        windows = restrict_targets(windows, [LABELS.index(x) for x in config.train_labels])
    out_dir = Path(config.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    context_dims = request_context(config, data)
    model = build_model(
        config,
        data.num_items,
        torch.from_numpy(data.item_attributes),
        torch.from_numpy(data.item_text) if data.item_text is not None else None,
        data.user_feature_cardinalities,
        data.train_times is not None,
        data.train_labels is not None,
        torch.from_numpy(data.cold_ads),
        long_term_dim(config, data),
        data.train_surfaces is not None,
        *context_dims,
        semantic_ids=None
        if id_table is None
        else torch.from_numpy(id_table.aligned(data.item_ids)),
    ).to(device)
    pop = np.bincount(windows.targets.ravel(), minlength=data.num_items + 1).astype(np.float64)
    pop[0] = 0
    log_pop = torch.from_numpy(np.log((pop + 1.0) / (pop + 1.0).sum()).astype(np.float32))
    wrapped: nn.Module = _TrainingLoss(model, config, log_pop).to(device)
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[local_rank] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )

    history: list[dict[str, float]] = []
    best: _Best = {"metric": -math.inf, "epoch": 0, "state": None, "stale": 0}
    start_epoch = 1
    resumed_average: list[torch.Tensor] | None = None
    ckpt_path = out_dir / CHECKPOINT
    if config.resume and ckpt_path.exists():
        saved = torch.load(ckpt_path, map_location=device, weights_only=False)
        _check_resume(saved, config)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        history, best, start_epoch = saved["history"], saved["best"], saved["epoch"] + 1
        resumed_average = saved.get("weight_average")
    average = (
        WeightAverage(model, config.weight_average, resumed_average)
        if config.weight_average
        else None
    )

    steps = max(1, len(windows) // config.batch_size)
    # Only a contextual model reads labels, scenarios and the requests' context; the others
    # train exactly as before.
    heads = (
        model.contextual
        and windows.target_labels is not None
        and windows.target_surfaces is not None
    )
    requests = heads and any(context_dims)
    from tqdm.auto import tqdm

    bar = tqdm(
        range(start_epoch, config.epochs + 1),
        desc=f"train {config.model} on {config.dataset}",
        unit="epoch",
        disable=not (config.progress and rank == 0),
        initial=start_epoch - 1,
        total=config.epochs,
    )
    for epoch in bar:
        wrapped.train()
        # Every random draw of an epoch derives from (seed, epoch), so a resumed run repeats
        # exactly the epochs it would have run.
        torch.manual_seed(config.seed * 100_003 + epoch * 7 + rank)
        draw = np.random.default_rng([config.seed, epoch])
        order = draw.permutation(len(windows))
        if config.batch_by_length:
            order = windows.by_length(order, config.batch_size, draw)
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 131 + rank)
        total = 0.0
        for step in range(steps):
            global_idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            idx = global_idx[rank::world]
            part = windows.take(idx)
            labels, scenarios = (
                (part.target_labels, part.target_surfaces) if heads else (None, None)
            )
            batch = make_batch(
                data,
                part.inputs,
                part.times,
                part.user_rows,
                device,
                labels,
                scenarios,
                long_term_rows=part.long_term_rows,
                queries=part.target_queries if requests else None,
                contexts=part.target_contexts if requests else None,
            )
            if all_action:
                # Drawn for the global batch, so one and two processes train on the same targets.
                step_draw = np.random.default_rng([config.seed, epoch, step])
                step_targets = windows.all_action_targets(global_idx, step_draw)[rank::world]
                step_targets = step_targets[:, -part.inputs.shape[1] :]
            else:
                step_targets = part.targets
            targets = torch.from_numpy(step_targets).to(device)
            if config.lr_schedule == "cosine":
                done = ((epoch - 1) * steps + step) / (config.epochs * steps)
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * 0.5 * (1.0 + math.cos(math.pi * done))
            loss = wrapped(batch, targets, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if average is not None:
                average.update()
            total += float(loss.detach())
        mean_loss = total / steps
        if world > 1:
            t = torch.tensor([mean_loss], device=device)
            dist.all_reduce(t)
            mean_loss = float(t) / world
        record: dict[str, float] = {"epoch": float(epoch), "loss": mean_loss}
        stop = False
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            if rank == 0:
                with average.swapped_in() if average is not None else contextlib.nullcontext():
                    metrics = evaluate_model(
                        model,
                        data,
                        "valid",
                        config.effective_protocol,
                        config.max_len,
                        seed=config.seed,
                    )
                    value = metrics[config.primary_metric]
                    state = (
                        {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                        if value > best["metric"]
                        else None
                    )
                record.update({f"valid.{k}": v for k, v in metrics.items() if "." not in k})
                if state is not None:
                    best = {"metric": value, "epoch": epoch, "stale": 0, "state": state}
                else:
                    best["stale"] = int(best["stale"]) + 1
                stop = bool(config.patience) and best["stale"] >= config.patience
                bar.set_postfix(loss=f"{mean_loss:.4f}", **{config.primary_metric: f"{value:.4f}"})
            if world > 1:
                flag = torch.tensor([int(stop)], device=device)
                dist.broadcast(flag, 0)
                stop = bool(flag)
        history.append(record)
        if rank == 0:
            _atomic_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "history": history,
                    "best": best,
                    "config": config.to_dict(),
                    "weight_average": None if average is None else average.average,
                },
                ckpt_path,
            )
        if stop:
            break
    bar.close()
    epochs_run = int(history[-1]["epoch"]) if history else 0

    valid_metrics: dict[str, float] = {}
    test_metrics: dict[str, float] = {}
    model_path = out_dir / MODEL_FILE
    if rank == 0:
        if best["state"] is not None:
            model.load_state_dict(best["state"])
        valid_metrics = evaluate_model(
            model, data, "valid", config.effective_protocol, config.max_len, seed=config.seed
        )
        test_metrics = evaluate_model(
            model, data, "test", config.effective_protocol, config.max_len, seed=config.seed
        )
        header = ModelHeader(
            model=config.model_config(),
            data=config.data_config(),
            item_ids=data.item_ids,
            user_feature_cardinalities=data.user_feature_cardinalities,
            has_timestamps=data.train_times is not None,
            has_labels=data.train_labels is not None,
            has_surfaces=data.train_surfaces is not None,
            long_term_dim=long_term_dim(config, data),
            query_text_dim=context_dims[0],
            has_context_items=context_dims[1],
            train_cutoff=data.train_cutoff,
            long_term_summariser=data.long_term.summariser if data.long_term else "",
            snapshot=data.snapshot,
            feature_service=data.feature_service,
            best_epoch=int(best["epoch"]),
            seed=config.seed,
            protocol=config.effective_protocol,
            primary_metric=config.primary_metric,
            training=config.to_dict(),
        )
        save_model(model_path, model, header)
    if world > 1:
        dist.barrier()
    result = TrainResult(
        config=config,
        out_dir=out_dir,
        model_path=model_path,
        valid_metrics=valid_metrics,
        test_metrics=test_metrics,
        history=history,
        best_epoch=int(best["epoch"]),
        epochs_run=epochs_run,
        wall_seconds=time.perf_counter() - t0,
        peak_memory_mb=_peak_memory_mb(device),
        data_summary=data.summary(),
        snapshot=data.snapshot,
        feature_service=data.feature_service,
        world_size=world,
        device=str(device),
    )
    if rank == 0 and config.track:
        from candgen.registry.tracking import log_run, register

        result.extra["run_id"] = log_run(result)
        if config.register_as:
            result.extra["registered"] = register(
                result.extra["run_id"],
                config.register_as,
                config.primary_metric,
                config.tracking_uri,
            )
    if rank == 0:
        (out_dir / METRICS_FILE).write_text(json.dumps(_result_json(result), indent=2))
    if world > 1:
        dist.destroy_process_group()
    return result


def _result_json(result: TrainResult) -> dict[str, Any]:
    return {
        "config": result.config.to_dict(),
        "valid": result.valid_metrics,
        "test": result.test_metrics,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "wall_seconds": result.wall_seconds,
        "peak_memory_mb": result.peak_memory_mb,
        "data": result.data_summary,
        "snapshot": result.snapshot,
        "world_size": result.world_size,
        "device": result.device,
        "history": result.history,
        **result.extra,
    }


def _atomic_save(obj: Any, path: Path) -> None:
    replace_atomically(path, lambda partial: torch.save(obj, partial))
