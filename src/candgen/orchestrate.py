"""Compiling and running ``pipelines/pipeline.py`` (the KFP v2 retrieval pipeline).

The pipeline and its components live beside the package (``pipelines/``, ``components/``), as
in the platform image, so this module puts the repository root on ``sys.path`` to import them.
"""

from __future__ import annotations

import json
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from candgen.errors import CandgenError, ConfigError
from candgen.paths import REPO_ROOT

PIPELINE_YAML = REPO_ROOT / "pipelines" / "pipeline.yaml"
# The pipeline's tasks in the order they run (kfp names them after their components).
TASKS = (
    "synth-data",
    "build-features",
    "long-term-features",
    "feature-store",
    "training-set",
    "train",
    "evaluate",
    "register-gate",
    "gate-open",
    "build-index",
    "learn-quotas",
    "export-repository",
    "deploy",
)


def pipeline_function() -> Any:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from pipelines.pipeline import retrieval_pipeline

    return retrieval_pipeline


def compile_pipeline(out: Path = PIPELINE_YAML) -> Path:
    """Writes the pipeline's IR YAML (what a Kubeflow Pipelines server runs) to ``out``."""
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_function(), str(out))
    return out


def pipeline_parameters() -> dict[str, tuple[type, Any]]:
    """The pipeline's parameters: name -> (type, default)."""
    import inspect

    fn = pipeline_function().pipeline_func
    hints = typing.get_type_hints(fn)
    return {name: (hints[name], p.default) for name, p in inspect.signature(fn).parameters.items()}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["epochs=5", "embed_text=false"]`` -> typed arguments; unknown names are errors."""
    params = pipeline_parameters()
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in params:
            raise ConfigError(
                name or pair,
                f"not a pipeline parameter; expected NAME=VALUE with NAME one of {sorted(params)}",
            )
        tp = params[name][0]
        try:
            if tp is bool:
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                out[name] = raw.lower() in ("true", "1")
            else:
                out[name] = tp(raw)
        except ValueError:
            raise ConfigError(name, f"expected {tp.__name__}, got {raw!r}") from None
    return out


@dataclass(frozen=True)
class LocalRun:
    """A finished kfp.local run: the pipeline's output (the gate's message) and its folder
    under the pipeline root, one sub-folder per task with its artifacts and outputs."""

    message: str
    run_dir: Path

    def outputs(self, task: str) -> dict[str, Any] | None:
        """The task's executor output (parameters and artifacts), or None if it did not run."""
        path = self.run_dir / task / "executor_output.json"
        return json.loads(path.read_text()) if path.exists() else None

    def artifact(self, task: str, name: str) -> Path:
        outputs = self.outputs(task) or {}
        try:
            return Path(outputs["artifacts"][name]["artifacts"][0]["uri"])
        except KeyError:
            raise CandgenError(f"{task}: no output artifact {name!r} (did the task run?)") from None

    def outcomes(self) -> list[tuple[str, str]]:
        """One line per task saying what it did, in the order the tasks run."""
        return [(task, describe_outcome(task, self.outputs(task))) for task in TASKS]


def _first_artifact(outputs: dict[str, Any], name: str) -> dict[str, Any]:
    metadata: dict[str, Any] = outputs["artifacts"][name]["artifacts"][0].get("metadata", {})
    return metadata


def describe_outcome(task: str, outputs: dict[str, Any] | None) -> str:
    """What a task's executor output says it did, in words."""
    if outputs is None:
        behind_gate = TASKS.index(task) > TASKS.index("gate-open")
        return "not run: the gate is closed" if behind_gate else "did not run"
    value = outputs.get("parameterValues", {})
    if task == "synth-data":
        m = _first_artifact(outputs, "marketplace")
        return (
            f"{m['events']:,} events of {m['users']:,} users on {m['ads']:,} ads, "
            f"{m['surfaces']} surfaces (snapshot {m['snapshot'][:12]})"
        )
    if task == "build-features":
        m = _first_artifact(outputs, "features")
        return (
            f"{m['user_short_term']:,} user sequences, {m['ad_attributes']:,} ads, "
            f"{m['ad_delivery']:,} delivery rows (snapshot {m['snapshot'][:12]})"
        )
    if task == "long-term-features":
        m = _first_artifact(outputs, "with_long_term")
        return (
            f"{m['long_term_rows']:,} daily long-term summaries (summariser trained before "
            f"{m['trained_before'][:10]}; snapshot {m['snapshot'][:12]})"
        )
    if task == "feature-store":
        m = _first_artifact(outputs, "store")
        return (
            f"applied {', '.join(m['feature_services'])}; {m['online']} online store "
            f"materialized to {m['materialized_to']}"
        )
    if task == "training-set":
        m = _first_artifact(outputs, "rows")
        return (
            f"{m['rows']:,} point-in-time rows ({m['service']}, {m['label']} rate "
            f"{m['positive_rate']:.2%})"
        )
    if task == "train":
        m = _first_artifact(outputs, "metrics")
        return (
            f"MLflow run {value['Output']}: test ndcg@10 {m['ndcg@10']:.4f}, "
            f"hr@10 {m['hr@10']:.4f}, recall@100 {m['recall@100']:.4f}"
        )
    if task == "evaluate":
        m = _first_artifact(outputs, "metrics")
        return " | ".join(
            f"{k} {m[k]:.4f} vs popularity {m['popularity.' + k]:.4f}"
            for k in ("ndcg@10", "recall@100")
            if k in m
        )
    if task == "register-gate":
        return str(value["message"])
    if task == "gate-open":
        return "open: the model goes on" if value["Output"] else "closed: nothing is deployed"
    if task == "build-index":
        m, index = _first_artifact(outputs, "metrics"), _first_artifact(outputs, "index")
        return (
            f"{index['kind']} index of {index['size']:,} ads for {index['model_uri']}, "
            f"recall@100 vs exact {m['recall_at_100']:.3f}"
        )
    if task == "learn-quotas":
        m = _first_artifact(outputs, "quotas")
        return (
            f"quotas learned from {m['requests']:,} logged requests of "
            f"{m['window'][0][:10]}..{m['window'][1][:10]}, activity buckets at "
            f"{m['activity_edges']}"
        )
    if task == "export-repository":
        m = _first_artifact(outputs, "repository")
        return (
            f"Triton repository v{m['version']} of {m['model_uri']} (run {m['run_id'][:12]}, "
            f"commit {m['git_commit'][:12]})"
        )
    return str(value.get("Output", value))


def run_local(arguments: dict[str, Any], pipeline_root: Path) -> LocalRun:
    """Runs the whole pipeline with ``kfp.local`` (each step a subprocess of this environment)."""
    import warnings

    from kfp import local

    # The steps run in this environment on purpose: it is the platform image's environment.
    warnings.filterwarnings(
        "ignore",
        message="You may be attemping to run a task that uses custom or non-Python base image",
    )
    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    pattern = f"{pipeline_function().name}-*"
    before = set(pipeline_root.glob(pattern))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    task = pipeline_function()(**arguments)
    (run_dir,) = set(pipeline_root.glob(pattern)) - before
    return LocalRun(message=str(task.output), run_dir=run_dir)


def submit(
    host: str,
    arguments: dict[str, Any],
    experiment: str = "candgen",
    run_name: str = "",
    namespace: str = "",
    package: Path = PIPELINE_YAML,
) -> dict[str, str]:
    """Submits the compiled pipeline to a Kubeflow Pipelines server through ``kfp.Client``.

    Returns:
        ``{"run_id", "host", "experiment"}``.

    Raises:
        CandgenError: the server cannot be reached or refuses the run (its message kept).
    """
    import contextlib
    import warnings

    import kfp

    if not host.startswith(("http://", "https://")):
        raise ConfigError("host", f"must be the KFP API's http(s) URL, got {host!r}")
    if not Path(package).exists():
        raise ConfigError("package", f"{package} does not exist; run `candgen pipeline compile`")
    # kfp prints the run's UI links: to stderr, so that stdout stays the JSON summary.
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        # kfp warns on every client that it needs a v2 server; candgen pipelines are v2.
        warnings.filterwarnings("ignore", message="This client only works with Kubeflow")
        try:
            client = kfp.Client(host=host, namespace=namespace or None)
            run = client.create_run_from_pipeline_package(
                str(package),
                arguments=arguments,
                run_name=run_name or None,
                experiment_name=experiment,
                namespace=namespace or None,
            )
        except Exception as e:  # kfp raises urllib3, ApiException and ValueError alike
            raise CandgenError(f"host: submitting to {host} failed: {e}") from None
    return {"run_id": run.run_id, "host": host, "experiment": experiment}
