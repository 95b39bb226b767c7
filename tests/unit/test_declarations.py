"""One declaration per setting: every default of a KFP component and of the pipeline equals the
config dataclass field (or library function parameter) it sets.

Lightweight components are compiled from their source, so their signatures must hold literals;
this test is what ties those literals to the one declaration. The pipeline's own parameters read
its presets (pipelines/pipeline.py) directly.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import pytest

from candgen.endpoint.export import ExportConfig, swap
from candgen.evaluation.evaluate import evaluate_saved_model
from candgen.features.training_set import write_training_set
from candgen.index.build import build_index as build_index_fn
from candgen.serving.steps import ServingConfig
from components.build_features.component import build_features
from components.build_index.component import build_index
from components.deploy.component import deploy
from components.evaluate.component import evaluate
from components.export_repository.component import export_repository
from components.feature_store.component import feature_store
from components.learn_quotas.component import learn_quotas
from components.long_term_features.component import long_term_features
from components.register_gate.component import register_gate
from components.synth_data.component import synth_data
from components.train.component import train
from components.training_set.component import training_set
from pipelines import pipeline as p

Source = Any  # a dataclass (its field defaults), a dataclass instance, a function or a dict


def declared(source: Source) -> dict[str, Any]:
    """The defaults a source declares, by name."""
    if isinstance(source, dict):
        return source
    if dataclasses.is_dataclass(source):
        if isinstance(source, type):
            return {f.name: f.default for f in dataclasses.fields(source)
                    if f.default is not dataclasses.MISSING}  # fmt: skip
        return {f.name: getattr(source, f.name) for f in dataclasses.fields(source)}
    params = inspect.signature(source).parameters.values()
    return {q.name: q.default for q in params if q.default is not inspect.Parameter.empty}


def signature_defaults(func: Callable[..., Any]) -> dict[str, Any]:
    return declared(getattr(func, "python_func", None) or getattr(func, "pipeline_func", func))


# For each component and the pipeline: where its defaults are declared (searched in order by
# parameter name; aliases name the field a differently named parameter sets), and the
# parameters that set no library field (their meaning is the component's own).
DECLARATIONS: list[tuple[Callable[..., Any], list[Source], dict[str, Any], set[str]]] = [
    (synth_data, [p.SYNTH], {}, set()),
    (build_features, [p.FEATURES], {}, set()),
    (feature_store, [p.STORE], {}, {"publish_dir"}),
    (training_set, [write_training_set, p.STORE], {}, set()),
    (long_term_features, [p.SUMMARISER, p.JOB], {}, {"image"}),
    (train, [p.TRAINING, p.JOB], {}, {"image"}),
    (evaluate, [evaluate_saved_model], {}, set()),
    (register_gate, [{"model_name": p.MODEL_NAME}, p.TRAINING], {}, set()),
    (build_index, [p.INDEX, build_index_fn], {}, set()),
    (learn_quotas, [p.QUOTAS], {}, set()),
    (export_repository, [ServingConfig, ExportConfig], {}, set()),
    (deploy, [swap], {}, {"triton_url"}),
    (
        p.retrieval_pipeline,
        [p.SYNTH, p.FEATURES, p.STORE, write_training_set, p.TRAINING, p.JOB,
         {"model_name": p.MODEL_NAME}, p.INDEX, p.SERVING, p.QUOTAS],
        {"long_term_epochs": p.SUMMARISER.epochs,
         "feature_registry_dir": declared(feature_store.python_func)["publish_dir"],
         "target_repository": declared(ExportConfig)["out"],
         "triton_url": declared(deploy.python_func)["triton_url"]},
        set(),
    ),
]  # fmt: skip


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "name", None) or func.__name__


@pytest.mark.parametrize(("func", "sources", "aliases", "own"), DECLARATIONS,
                         ids=[_name(d[0]) for d in DECLARATIONS])  # fmt: skip
def test_every_default_is_its_declaration(
    func: Callable[..., Any], sources: list[Source], aliases: dict[str, Any], own: set[str]
) -> None:
    defaults = signature_defaults(func)
    assert own <= set(defaults), f"own parameters {own - set(defaults)} are gone"
    wrong, undeclared = {}, []
    for name, value in defaults.items():
        if name in own:
            continue
        if name in aliases:
            expected = aliases[name]
        else:
            found = [declared(s)[name] for s in sources if name in declared(s)]
            if not found:
                undeclared.append(name)
                continue
            expected = found[0]
        if value != expected or type(value) is not type(expected):
            wrong[name] = (value, expected)
    assert undeclared == [], "parameters that set no declared field"
    assert wrong == {}, "(default, declaration) of parameters whose default differs"


def test_the_pipeline_passes_its_settings_to_components_that_differ_from_it() -> None:
    # The pipeline's seed seeds data and training; its quota policy is asked for by name. The
    # components keep the library's defaults, so the pipeline must pass these explicitly.
    source = inspect.getsource(p.retrieval_pipeline.pipeline_func)
    for passed in ("seed=seed", "quota_policy=quota_policy", "eval_days=eval_days"):
        assert passed in source


def test_the_summariser_reads_the_training_windows_it_must_not_see() -> None:
    assert p.SUMMARISER.eval_days == p.TRAINING.eval_days == p.QUOTAS.eval_days
