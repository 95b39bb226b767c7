"""Training the long-term summariser and writing its summaries into the features.

The summariser is an all-action HSTU (see ``candgen.features.long_term``, which applies a
trained one to every daily snapshot).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from candgen.errors import CandgenError
from candgen.features.long_term import summarise
from candgen.training.config import JobConfig, TrainConfig


@dataclass(frozen=True)
class SummariserConfig:
    """How the long-term summariser trains (`candgen features long-term` flags and the pipeline's
    long_term_features step). The rest of its training config is fixed: an HSTU without time bias
    (user_long_term holds ids only) trained with the dense all-action objective.

    Attributes:
        eval_days: the eval_days of the models that read the summaries: the summariser never
            trains on their validation or test windows (a model with fewer days may read them
            too; one with more is refused).
        epochs: passes over the training users.
        max_len: the longest history it reads (PinnerFormer reads a long sequence; the
            marketplace's user_long_term keeps the last 200 actions).
        all_action_days: the future window each position predicts an action of, in days.
        lr: Adam learning rate.
        batch_size: global batch (split across processes).
        seed: the seed of its data order, negatives and initialisation.
        out_dir: where the summariser (model.pt) goes.
    """

    eval_days: int = 2
    epochs: int = 20
    max_len: int = 200
    all_action_days: float = 7.0
    lr: float = 3e-3
    batch_size: int = 128
    seed: int = 42
    out_dir: str = "runs/long-term"

    def train_config(self, data_dir: Path | str, progress: bool = True) -> TrainConfig:
        """The summariser's training config on the marketplace in ``data_dir``."""
        return TrainConfig(
            dataset="marketplace",
            data_dir=str(data_dir),
            model="hstu",
            objective="all_action",
            time_bias=False,
            eval_every=5,
            primary_metric="recall@100",
            track=False,
            progress=progress,
            **dataclasses.asdict(self),
        )


def build_long_term_features(
    config: TrainConfig, features_dir: Path | str, job: JobConfig | None = None
) -> dict[str, Any]:
    """Trains the summariser (a TorchX job when ``job`` is given, else in this process) and
    writes its summaries into ``features_dir``.

    Returns:
        The summary of ``summarise`` plus the summariser's test metrics on the held-out window.
    """
    from candgen.training.trainer import MODEL_FILE

    if config.objective != "all_action":
        raise CandgenError(
            f"objective: the long-term summariser trains with all_action, not {config.objective}"
        )
    if job is not None:
        from candgen.training.launch import launch

        metrics = launch(config, job)["test"]
    else:
        from candgen.training.trainer import train

        metrics = train(config).test_metrics
    summary = summarise(Path(config.out_dir) / MODEL_FILE, features_dir, progress=config.progress)
    keys = ("recall@100", "hr@10", "ndcg@10")
    return {
        **summary,
        "summariser": {k: metrics[k] for k in keys if k in metrics},
        "config": dataclasses.asdict(config),
    }
