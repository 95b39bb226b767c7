"""The training configuration: one frozen dataclass, mapped 1:1 onto `candgen train` flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from candgen.data.config import DataConfig
from candgen.errors import ConfigError
from candgen.images import PLATFORM_IMAGE
from candgen.models.config import ModelConfig
from candgen.vocab import DEVICES, LABELS

LOSSES = ("sampled", "full")
OBJECTIVES = ("next_item", "all_action")
EXAMPLES = ("positions", "prefixes")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig(DataConfig, ModelConfig):
    """How to train one retrieval model: the data (``DataConfig``) and the model
    (``ModelConfig``) it extends, plus the loss, the optimiser, evaluation, the run and tracking.

    Flat on purpose: every field is one `candgen train` flag and one pipeline parameter, each
    declared once, in the dataclass that owns it.

    Attributes:
        loss: sampled (log-Q-corrected sampled softmax) or full (softmax over all items).
        num_negatives: uniform negatives per step for the sampled loss.
        in_batch_negatives: also use the batch's other positives as negatives.
        epochs: passes over the training users.
        batch_size: global batch (split across processes).
        lr: Adam learning rate.
        weight_decay: AdamW weight decay.
        seed: the one seed for data order, negatives, dropout and initialisation.
        eval_every: validate every this many epochs (and at the last).
        patience: stop after this many validations without improvement (0: never).
        primary_metric: the validation metric that picks the best epoch and gates promotion.
        protocol: full or sampled100; empty means sampled100 for games, else full.
        out_dir: where checkpoints, metrics and plots go.
        resume: continue from out_dir/checkpoint.pt if it exists.
        device: auto (cuda when present), cpu or cuda.
        threads: torch CPU threads per process (0: torch's default).
        progress: show a progress bar.
        track: log the run to MLflow.
        tracking_uri: MLflow tracking URI; empty means sqlite:///<repo>/mlflow.db.
        experiment: MLflow experiment name.
        register_as: if set, register the model under this name with alias challenger.
        label_weights: unified (or generative on its backbone) only: loss weight of organic,
            click and conversion targets.
        train_labels: the labels whose targets train the model (all by default; one label
            gives a single-task baseline). Items of other labels still count as history.
        objective: next_item (each position predicts the next item) or all_action (each
            position predicts a random one of the user's actions in the next all_action_days:
            PinnerFormer's dense all-action objective, which trains the long-term summariser).
        all_action_days: the future window of the all_action objective, in days.
        examples: positions (each window trains every position on its next item: one forward
            pass per window) or prefixes (each target is one example, trained at the last
            position of the window that ends before it, where serving reads the user state:
            FMLP-Rec's and BSARec's examples, one forward pass per target).
        lr_schedule: constant, or cosine (the rate falls from lr to 0 along a half cosine over
            the epochs, step by step: a run that has to stop at a fixed budget ends on small
            steps).
        semantic_ids: generative only: the semantic ID table (`candgen semantic-ids`) of
            every item of the data set.
        batch_by_length: draw each batch from windows of similar length (sorted within chunks
            of 64 batches, the batches shuffled), so that a batch of short windows is not
            padded to the longest one in the data.
        weight_average: the decay of an exponential moving average of the weights, updated
            after every step; validation reads the average, and the saved model is the best
            validated average (0: off, the weights as trained).
    """

    loss: str = "sampled"
    num_negatives: int = 256
    in_batch_negatives: bool = True
    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 42
    eval_every: int = 5
    patience: int = 0
    primary_metric: str = "ndcg@10"
    protocol: str = ""
    out_dir: str = "runs/train"
    resume: bool = False
    device: str = "auto"
    threads: int = 0
    progress: bool = True
    track: bool = True
    tracking_uri: str = ""
    experiment: str = "candgen"
    register_as: str = ""
    label_weights: tuple[float, float, float] = (1.0, 1.0, 2.0)
    train_labels: tuple[str, ...] = LABELS
    objective: str = "next_item"
    all_action_days: float = 7.0
    examples: str = "positions"
    batch_by_length: bool = False
    lr_schedule: str = "constant"
    semantic_ids: str = ""
    weight_average: float = 0.0

    def __post_init__(self) -> None:
        DataConfig.__post_init__(self)
        ModelConfig.__post_init__(self)
        choices = {
            "loss": LOSSES,
            "device": DEVICES,
            "protocol": ("", "full", "sampled100"),
            "objective": OBJECTIVES,
            "examples": EXAMPLES,
            "lr_schedule": LR_SCHEDULES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"{getattr(self, name)!r} is not one of {allowed}")
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("num_negatives", "patience", "threads", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if (
            len(self.label_weights) != len(LABELS)
            or min(self.label_weights) < 0
            or not (sum(self.label_weights) > 0)
        ):
            raise ConfigError(
                "label_weights",
                f"need {len(LABELS)} weights >= 0 "
                f"({', '.join(LABELS)}) with a positive sum, got "
                f"{self.label_weights}",
            )
        if not self.train_labels or not set(self.train_labels) <= set(LABELS):
            raise ConfigError(
                "train_labels", f"need one or more of {LABELS}, got {self.train_labels}"
            )
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not 0.0 <= self.weight_average < 1.0:
            raise ConfigError("weight_average", f"must be in [0, 1), got {self.weight_average}")
        if self.loss == "sampled" and self.num_negatives == 0 and not self.in_batch_negatives:
            raise ConfigError(
                "num_negatives", "the sampled loss needs negatives: set > 0 or --in-batch-negatives"
            )
        if not self.all_action_days > 0:
            raise ConfigError("all_action_days", f"must be > 0, got {self.all_action_days}")
        if self.objective == "all_action" and self.encoder == "unified":
            raise ConfigError(
                "objective",
                "all_action trains a long-term summariser (hstu, "
                "sasrec, two_tower); the unified model trains next_item per label",
            )
        metric, _, k = self.primary_metric.partition("@")
        if metric not in ("hr", "ndcg", "recall") or not k.isdigit():
            raise ConfigError(
                "primary_metric", f"expected hr@K, ndcg@K or recall@K, got {self.primary_metric!r}"
            )
        if self.encoder == "bsarec" and self.examples != "prefixes":
            raise ConfigError(
                "examples",
                "bsarec's frequency filter reads the whole window, so only its last position "
                "may train: use prefixes",
            )
        if self.model == "generative":
            if not self.semantic_ids:
                raise ConfigError(
                    "semantic_ids",
                    "the generative model trains on the items' semantic IDs: build the "
                    "table with `candgen semantic-ids` and pass its path",
                )
            if self.objective != "next_item":
                raise ConfigError("objective", "the generative model trains next_item only")
            if self.effective_protocol != "full":
                raise ConfigError(
                    "protocol",
                    "a generative model writes its candidates, so it is evaluated by full "
                    "ranking; set protocol to full",
                )
            if self.beam_width < int(k):
                raise ConfigError(
                    "beam_width",
                    f"{self.beam_width} candidates cannot answer {self.primary_metric}",
                )
        if self.examples == "prefixes" and self.objective == "all_action":
            raise ConfigError(
                "examples",
                "all_action trains every position on its future window; prefixes trains the "
                "last position only: use positions",
            )

    @property
    def effective_protocol(self) -> str:
        return self.protocol or ("sampled100" if self.dataset == "games" else "full")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown training config field(s) {unknown}")
        # JSON (metrics.json, MLflow) turns tuples into lists
        fields: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in values.items()
        }
        return cls(**fields)


SCHEDULERS = ("local_cwd", "kubernetes")


@dataclass(frozen=True)
class JobConfig:
    """Where the TorchX training job runs and how big it is (`candgen train` flags and the
    pipeline parameters of the same names).

    Attributes:
        scheduler: local_cwd (processes on this machine) or kubernetes (a Volcano job).
        replicas: nodes of the job (kubernetes: one pod each).
        nproc: training processes per replica (one per GPU when there are GPUs).
        cpus: kubernetes: CPUs per replica.
        memory_mb: kubernetes: memory per replica, MB.
        gpus: kubernetes: GPUs per replica (the trainer picks nccl when it sees one).
        image: kubernetes: the image every replica runs (the platform image).
        queue: kubernetes: the Volcano queue.
        namespace: kubernetes: the namespace of the job (where work_volume lives).
        service_account: kubernetes: the pods' service account; object-store and registry
            access come through it (workload identity), never through secrets in the spec.
        work_volume: kubernetes: a ReadWriteMany PersistentVolumeClaim that the launching pod
            and every replica mount at work_dir: inputs are staged there, outputs come back.
        work_dir: kubernetes: where work_volume is mounted.
    """

    scheduler: str = "local_cwd"
    replicas: int = 1
    nproc: int = 2
    cpus: int = 4
    memory_mb: int = 16_384
    gpus: int = 0
    image: str = PLATFORM_IMAGE
    queue: str = "default"
    namespace: str = "candgen"
    service_account: str = "candgen-train"
    work_volume: str = "candgen-work"
    work_dir: str = "/mnt/candgen"

    @classmethod
    def with_image(cls, image: str = "", **fields: Any) -> JobConfig:
        """The job of ``fields``; an empty ``image`` means the platform image (what a pipeline
        step passes when its own image should run the job)."""
        chosen: dict[str, Any] = {"image": image} if image else {}
        return cls(**fields, **chosen)

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError("scheduler", f"{self.scheduler!r} is not one of {SCHEDULERS}")
        for name in ("replicas", "nproc", "cpus", "memory_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.gpus < 0:
            raise ConfigError("gpus", f"must be >= 0, got {self.gpus}")
        if self.scheduler == "kubernetes":
            if not self.image:
                raise ConfigError("image", "the kubernetes scheduler needs the platform image")
            for name in ("queue", "namespace", "work_volume"):
                if not getattr(self, name):
                    raise ConfigError(name, "the kubernetes scheduler needs it")
            if not self.work_dir.startswith("/"):
                raise ConfigError("work_dir", f"must be an absolute path, got {self.work_dir!r}")
        elif self.replicas != 1:
            raise ConfigError("replicas", "local_cwd runs one replica on this machine; use nproc")
