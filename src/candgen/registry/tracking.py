"""Logging training runs to MLflow, registering them, and promoting by alias.

The default tracking store is SQLite under the repository (``mlflow.db``, artifacts in
``mlartifacts/``); any MLflow URI works, e.g. ``postgresql://user@host:5432/db``.
A registered version holds the user encoder (``model.pt``), the item embeddings
(``item_embeddings.npy``) and the training config, and is tagged with its data snapshot, feature
service and git commit, so that every served model traces back to its run, data and code.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from candgen.errors import CandgenError
from candgen.paths import REPO_ROOT

CHALLENGER = "challenger"
CHAMPION = "champion"
MODEL_ARTIFACT = "model"
MODEL_URI_TAG = "candgen.model_uri"
PYFUNC_CODE = Path(__file__).with_name("retriever_model.py")


def default_tracking_uri() -> str:
    return f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def metric_key(name: str) -> str:
    """MLflow metric names cannot hold '@': ``valid.ndcg@10`` is logged as ``valid.ndcg_at_10``."""
    return name.replace("@", "_at_")


def git_commit() -> str:
    """The repository's HEAD commit, suffixed ``-dirty`` when tracked files have changed."""
    try:

        def git(*args: str) -> str:
            out = subprocess.run(
                ["git", *args], cwd=REPO_ROOT, check=True, capture_output=True, text=True
            )
            return out.stdout.strip()

        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def client(tracking_uri: str = "") -> Any:
    """An MlflowClient on ``tracking_uri`` (default: SQLite under the repository)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(mlflow_client: Any, name: str, tracking_uri: str = "") -> str:
    """The id of experiment ``name``, created (with artifacts beside a SQLite store) if new."""
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    uri = tracking_uri or default_tracking_uri()
    # Artifacts sit beside a SQLite store; other stores use the repository's mlartifacts/.
    root = (
        Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else REPO_ROOT
    )
    location = (root / "mlartifacts" / name).as_uri()
    return str(mlflow_client.create_experiment(name, artifact_location=location))


def _plots(result: Any, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from candgen.evaluation.metrics import KS

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in result.history]
    ax.plot(epochs, [h["loss"] for h in result.history], marker=".")
    ax.set(
        xlabel="epoch",
        ylabel="training loss",
        title=f"{result.config.model} on {result.config.dataset}: loss",
    )
    ax.grid(alpha=0.3)
    paths.append(out / "loss.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for split, metrics in (("valid", result.valid_metrics), ("test", result.test_metrics)):
        ks = [k for k in KS if f"recall@{k}" in metrics]
        ax.plot(ks, [metrics[f"recall@{k}"] for k in ks], marker="o", label=split)
    ax.set(
        xscale="log",
        xlabel="K",
        ylabel="Recall@K",
        title=f"Recall@K ({result.config.effective_protocol} protocol)",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(out / "recall_at_k.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    return paths


def log_run(result: Any) -> str:
    """Logs a ``TrainResult`` to MLflow: params, per-epoch and final metrics, plots and the model.

    Returns:
        The MLflow run id.
    """
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from candgen.models.factory import load_model

    cfg = result.config
    mc = client(cfg.tracking_uri)
    exp = experiment_id(mc, cfg.experiment, cfg.tracking_uri)
    model, saved = load_model(result.model_path)
    with mlflow.start_run(experiment_id=exp, run_name=f"{cfg.model}-{cfg.dataset}") as run:
        mlflow.log_params(cfg.to_dict())
        mlflow.set_tags(
            {
                "data_snapshot": result.snapshot,
                "feature_service": result.feature_service or "none",
                "git_commit": git_commit(),
                "world_size": str(result.world_size),
                "device": result.device,
            }
        )
        for h in result.history:
            step = int(h["epoch"])
            mlflow.log_metrics({metric_key(k): v for k, v in h.items() if k != "epoch"}, step)
        final = {f"valid.{k}": v for k, v in result.valid_metrics.items()}
        final |= {f"test.{k}": v for k, v in result.test_metrics.items()}
        final |= {
            "wall_seconds": result.wall_seconds,
            "peak_memory_mb": result.peak_memory_mb,
            "best_epoch": float(result.best_epoch),
        }
        mlflow.log_metrics({metric_key(k): float(v) for k, v in final.items()})
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            for png in _plots(result, tmp_path):
                mlflow.log_artifact(str(png), "plots")
            table = model.item_table().numpy()
            np.save(tmp_path / "item_embeddings.npy", table)
            (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            example = pd.DataFrame({"history": [[int(x) for x in saved.item_ids[1:4]]]})
            signature = infer_signature(
                example,
                pd.DataFrame({"item_ids": [[1, 2]], "scores": [[0.5, 0.25]]}),
                params={"k": 100},
            )
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(PYFUNC_CODE),
                artifacts={
                    "model": str(result.model_path),
                    "item_embeddings": str(tmp_path / "item_embeddings.npy"),
                    "config": str(tmp_path / "config.json"),
                },
                signature=signature,
                input_example=(example, {"k": 5}),
                pip_requirements=[f"candgen @ file://{REPO_ROOT}"],
            )
            mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
        return str(run.info.run_id)


def register(run_id: str, name: str, primary_metric: str, tracking_uri: str = "") -> dict[str, str]:
    """Registers a run's model as a new version of ``name`` and gives it alias ``challenger``.

    The version is tagged with the run's data snapshot, feature service, git commit and its
    test value of ``primary_metric`` (what promotion compares).

    Returns:
        ``{"name", "version", "alias", "primary_metric", "value"}``.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    mc = client(tracking_uri)
    try:
        run = mc.get_run(run_id)
    except MlflowException:
        where = tracking_uri or "the default store"
        raise CandgenError(f"run_id: no run {run_id!r} in {where}") from None
    key = f"test.{primary_metric}"
    value = run.data.metrics.get(metric_key(key))
    if value is None:
        raise CandgenError(f"primary_metric: run {run_id} has no metric {key!r}")
    model_uri = run.data.tags.get(MODEL_URI_TAG)
    if model_uri is None:
        raise CandgenError(f"run_id: run {run_id} has no candgen model (tag {MODEL_URI_TAG})")
    version = mlflow.register_model(model_uri, name)
    tags = {k: run.data.tags.get(k, "") for k in ("data_snapshot", "feature_service", "git_commit")}
    tags |= {
        "primary_metric": key,
        "primary_metric_value": repr(float(value)),
        "dataset": run.data.params.get("dataset", ""),
        "model": run.data.params.get("model", ""),
    }
    for k, v in tags.items():
        mc.set_model_version_tag(name, version.version, k, v)
    mc.set_registered_model_alias(name, CHALLENGER, version.version)
    return {
        "name": name,
        "version": str(version.version),
        "alias": CHALLENGER,
        "primary_metric": key,
        "value": repr(float(value)),
    }


def resolve_version(model_uri: str, tracking_uri: str = "") -> Any | None:
    """The registered ModelVersion behind ``models:/<name>@<alias>`` or ``models:/<name>/<n>``;
    None for other URIs (``runs:/...``).

    Raises:
        CandgenError: the model, alias or version is not registered (named in the message).
    """
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        return None
    mc = client(tracking_uri)
    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    try:
        if alias:
            return mc.get_model_version_by_alias(name, alias)
        if "/" in name:
            name, number = name.split("/", 1)
            return mc.get_model_version(name, number)
    except MlflowException as e:
        raise CandgenError(f"model_uri: cannot resolve {model_uri!r}: {e.message}") from None
    raise CandgenError(
        f"model_uri: {model_uri!r} names no alias or version "
        "(models:/<name>@<alias> or models:/<name>/<version>)"
    )


def _by_alias(mc: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return mc.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


class PromotionRefused(CandgenError):
    """The challenger's primary metric is below the champion's."""


def promote(name: str, tracking_uri: str = "") -> dict[str, str]:
    """Moves alias ``champion`` to the ``challenger`` version if it is at least as good.

    Both versions are compared on the primary metric recorded at registration.

    Returns:
        What happened: ``{"name", "champion", "previous_champion", "metric", ...}``.

    Raises:
        PromotionRefused: the challenger is worse; nothing is changed.
        CandgenError: the model or its challenger does not exist, or the two versions were
            measured on different metrics.
    """
    from mlflow.exceptions import MlflowException

    mc = client(tracking_uri)
    try:
        mc.get_registered_model(name)
    except MlflowException:
        raise CandgenError(f"name: no registered model {name!r}") from None
    challenger = _by_alias(mc, name, CHALLENGER)
    if challenger is None:
        raise CandgenError(f"{name}: no version has alias {CHALLENGER!r}; register one first")
    champion = _by_alias(mc, name, CHAMPION)
    c_metric = challenger.tags.get("primary_metric", "")
    c_value = float(challenger.tags.get("primary_metric_value", "nan"))
    out = {
        "name": name,
        "challenger": str(challenger.version),
        "metric": c_metric,
        "challenger_value": repr(c_value),
    }
    if champion is not None:
        if champion.version == challenger.version:
            return out | {"champion": str(champion.version), "status": "already champion"}
        p_metric = champion.tags.get("primary_metric", "")
        p_value = float(champion.tags.get("primary_metric_value", "nan"))
        if p_metric != c_metric:
            raise CandgenError(
                f"{name}: champion v{champion.version} was measured on "
                f"{p_metric!r}, challenger v{challenger.version} on "
                f"{c_metric!r}; they cannot be compared"
            )
        if not c_value >= p_value:
            raise PromotionRefused(
                f"{name}: refused to promote v{challenger.version}: its {c_metric} = "
                f"{c_value:.4f} is below champion v{champion.version}'s {p_value:.4f}; "
                f"{CHAMPION!r} stays on v{champion.version}"
            )
        out |= {"previous_champion": str(champion.version), "champion_value": repr(p_value)}
    mc.set_registered_model_alias(name, CHAMPION, challenger.version)
    return out | {"champion": str(challenger.version), "status": "promoted"}


def describe(name: str, tracking_uri: str = "") -> dict[str, Any]:
    """Every version of ``name`` with its aliases, run and lineage tags."""
    from mlflow.exceptions import MlflowException

    mc = client(tracking_uri)
    try:
        model = mc.get_registered_model(name)
    except MlflowException:
        raise CandgenError(f"name: no registered model {name!r}") from None
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    versions = sorted(mc.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    return {
        "name": name,
        "versions": [
            {
                "version": v.version,
                "aliases": aliases.get(str(v.version), []),
                "run_id": v.run_id,
                **v.tags,
            }
            for v in versions
        ],
    }
