"""Training the long-term summariser and writing its summaries into the features.

The summariser is an all-action HSTU (see ``candgen.features.long_term``, which applies a
trained one to every daily snapshot).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from candgen.errors import CandgenError
from candgen.features.long_term import summarise
from candgen.training.config import JobConfig, TrainConfig

# The summariser's settings where the caller gives none (PinnerFormer reads a long sequence; the
# marketplace's user_long_term keeps the last 200 actions).
SUMMARISER = {"model": "hstu", "objective": "all_action", "max_len": 200, "time_bias": False,
              "epochs": 20, "lr": 3e-3, "batch_size": 128, "eval_every": 5,
              "primary_metric": "recall@100"}  # fmt: skip


def summariser_config(
    data_dir: Path | str, out_dir: Path | str, eval_days: int, **overrides: Any
) -> TrainConfig:
    """The summariser's training config on a marketplace (``overrides`` are TrainConfig fields).

    ``eval_days`` must be the one the models that read the summary train with: the summariser
    then sees no action of their validation or test windows.
    """
    values = {**SUMMARISER, **overrides}
    return TrainConfig(dataset="marketplace", data_dir=str(data_dir), out_dir=str(out_dir),
                       eval_days=eval_days, track=False, **values)  # fmt: skip


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
        raise CandgenError(f"objective: the long-term summariser trains with all_action, not "
                           f"{config.objective}")  # fmt: skip
    if job is not None:
        from candgen.training.launch import launch

        metrics = launch(config, job)["test"]
    else:
        from candgen.training.trainer import train

        metrics = train(config).test_metrics
    summary = summarise(Path(config.out_dir) / MODEL_FILE, features_dir, progress=config.progress)
    keys = ("recall@100", "hr@10", "ndcg@10")
    return {**summary, "summariser": {k: metrics[k] for k in keys if k in metrics},
            "config": dataclasses.asdict(config)}  # fmt: skip
