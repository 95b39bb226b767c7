"""Compiling and running ``pipelines/pipeline.py`` (the KFP v2 retrieval pipeline).

The pipeline and its components live beside the package (``pipelines/``, ``components/``), as
in the platform image, so this module puts the repository root on ``sys.path`` to import them.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any

from candgen.errors import ConfigError
from candgen.paths import REPO_ROOT

PIPELINE_YAML = REPO_ROOT / "pipelines" / "pipeline.yaml"


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
    return {name: (hints[name], p.default)
            for name, p in inspect.signature(fn).parameters.items()}  # fmt: skip


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["epochs=5", "embed_text=false"]`` -> typed arguments; unknown names are errors."""
    params = pipeline_parameters()
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in params:
            raise ConfigError(name or pair, f"not a pipeline parameter; expected NAME=VALUE with "
                              f"NAME one of {sorted(params)}")  # fmt: skip
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


def run_local(arguments: dict[str, Any], pipeline_root: Path) -> Any:
    """Runs the whole pipeline with ``kfp.local`` (each step a subprocess of this environment);
    returns the run (its ``output`` is the gate's message)."""
    import warnings

    from kfp import local

    # The steps run in this environment on purpose: it is the platform image's environment.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses "
                            "custom or non-Python base image")  # fmt: skip
    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    return pipeline_function()(**arguments)


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

    from candgen.errors import CandgenError

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
                str(package), arguments=arguments, run_name=run_name or None,
                experiment_name=experiment, namespace=namespace or None,
            )  # fmt: skip
        except Exception as e:  # kfp raises urllib3, ApiException and ValueError alike
            raise CandgenError(f"host: submitting to {host} failed: {e}") from None
    return {"run_id": run.run_id, "host": host, "experiment": experiment}
