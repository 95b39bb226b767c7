"""Exporting a registered model version as a Triton model repository, and swapping it in live.

The repository's definitions (each model's ``config.pbtxt``, each step's ``model.py`` shell) come
from one generator, ``repository_definitions``. Rendered for version 1 with the default settings
they are checked in as ``serving/model_repository`` (``make serving-definitions`` rewrites it; a
unit test fails when it drifts from the code); an export renders the same text for its own
version and instance count, and adds the version's assets beside it.

Layout of the repository (``<repo>``)::

    retrieve/config.pbtxt               the ensemble; its steps are pinned to one version
    retrieve/<v>/serving.json           what that version is (model URI, run, commit, snapshots)
    candgen_<step>/config.pbtxt         python backend, version_policy all
    candgen_<step>/<v>/model.py         two lines: the step's name and candgen.serving's shell
    candgen_<step>/<v>/...              the step's assets (serving.json, model.pt, ads.faiss...)

``<v>`` is the registry version number. A new export adds its version beside the previous one
(older ones are pruned) and re-pins the ensemble; ``swap`` then asks Triton (explicit model
control) to load the ensemble, which loads the new step versions first. Triton keeps serving the old
ensemble until the new one is ready, and the old one keeps its own pinned steps, so no request
sees a mix of versions and none fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import py_compile
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from candgen.errors import CandgenError, ConfigError
from candgen.index.ann import INDEX_FILE, MAX_FETCH, AdIndex, IndexConfig, ids_file
from candgen.paths import REPO_ROOT, replace_atomically
from candgen.serving.contract import INPUTS, OUTPUTS
from candgen.serving.diversity import AdCatalog, duplicate_groups
from candgen.serving.eligibility import AdTable, DeliveryState, save_eligibility
from candgen.serving.generators import ContentGenerator
from candgen.serving.pipeline import USER_SERVICE
from candgen.serving.query_encoder import QUERY_ENCODER_DIR, check_precision
from candgen.serving.quota import QUOTA_FILE, LearnedQuotas
from candgen.serving.shards import shard_of
from candgen.serving.steps import (
    CONTENT_DIR,
    DELIVERY_FILE,
    ENSEMBLE,
    GENERATIVE_ADS_FILE,
    GENERATIVE_DIR,
    MODEL_FILE,
    SERVING_FILE,
    STEPS,
    TABLE_FILE,
    EncoderStep,
    FeaturesStep,
    GeneratorsStep,
    SelectStep,
    ServingConfig,
    ShardStep,
    Spec,
    Step,
    check_query_width,
    pinned_version,
    read_serving_file,
    write_serving_file,
)

TRITON_TYPES = {
    np.int64: "TYPE_INT64",
    np.int32: "TYPE_INT32",
    np.float32: "TYPE_FP32",
    np.float64: "TYPE_FP64",
    np.object_: "TYPE_STRING",
}
MODEL_PY = '''"""candgen's retrieve ensemble, step {model} (a thin shell; see candgen.serving)."""

import triton_python_backend_utils as pb_utils

from candgen.serving.triton_model import triton_model

TritonPythonModel = triton_model("{model}", pb_utils)
'''


@dataclass(frozen=True)
class ExportConfig:
    """What ``candgen serving export`` writes (CLI flags map onto these fields).

    Attributes:
        model_uri: the registered version, ``models:/<name>@<alias>`` or ``models:/<name>/<n>``.
        out: the Triton model repository (created; other versions in it are kept or pruned).
        features_dir: the offline feature tables (ad text embeddings, delivery state).
        keep_versions: versions kept in the repository (the new one included; >= 2 keeps the
            previous version loaded for a rollback).
        tracking_uri: MLflow tracking URI (default: SQLite under the repository).
        index_dir: an index already built for ``model_uri`` by ``candgen index build`` (a
            pipeline's index step); empty: build it here.
        quotas: a learned quota table (``candgen quotas learn``) for the select step; the
            learned quota policy needs one.
        query_encoder_precision: the search query's MiniLM graph: ``int8`` (int8 weights on
            every MatMul but the first layer's: about 40% faster on a cache miss, and 97% of
            the query generator's top 100 ads are the ones fp32 finds) or ``fp32`` (exactly the
            ads' text model).
        serving: how the ensemble serves.
        index: the sequential generator's ANN index.
        ad_shards_out: where the ads index's shards go when ``serving.ad_shard_urls`` names
            their servers: one Triton repository per shard, ``shard-<i>``, for the server at
            position i (empty: ``ad_shards`` beside ``out``).
        generative_uri: a registered generative model of the same data
            (``models:/<name>@<alias>``, trained with ``--model generative``): the ads it
            writes join the generators (``candgen.serving.generative``); empty: none.
    """

    model_uri: str
    out: str = "data/model_repository"
    features_dir: str = "data/demo/features"
    keep_versions: int = 2
    tracking_uri: str = ""
    index_dir: str = ""
    quotas: str = ""
    query_encoder_precision: str = "int8"
    serving: ServingConfig = field(default_factory=ServingConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    ad_shards_out: str = ""
    generative_uri: str = ""

    @property
    def shards_dir(self) -> Path:
        return Path(self.ad_shards_out or Path(self.out).parent / "ad_shards")

    def __post_init__(self) -> None:
        if self.serving.ad_shard_urls and self.index_dir:
            raise ConfigError(
                "index_dir",
                "a sharded export (ad_shard_urls) builds its shards itself; leave index_dir empty",
            )
        if not self.model_uri.startswith("models:/"):
            raise ConfigError(
                "model_uri",
                f"must be a registry URI (models:/<name>@<alias> or "
                f"models:/<name>/<version>), got {self.model_uri!r}",
            )
        if self.generative_uri and not self.generative_uri.startswith("models:/"):
            raise ConfigError(
                "generative_uri",
                f"must be a registry URI (models:/<name>@<alias>), got {self.generative_uri!r}",
            )
        if self.keep_versions < 1:
            raise ConfigError("keep_versions", f"must be >= 1, got {self.keep_versions}")
        check_precision(self.query_encoder_precision)
        if self.serving.quota_policy == "learned" and not self.quotas:
            raise ConfigError(
                "quotas",
                "the learned quota policy needs the learned table "
                "(candgen quotas learn), given as --quotas",
            )


def _dims(dims: list[int]) -> str:
    return ", ".join(map(str, dims))


def _tensors(kind: str, spec: Spec, ragged: bool = False) -> str:
    """The config's tensors; with ``ragged``, variable-length ones may be batched with others of
    another length (Triton's dynamic batcher otherwise batches only equal shapes; the python
    backend gets each request's own tensors either way)."""
    rows = []
    for name, (dtype, dims, optional) in spec.items():
        opt = " optional: true" if optional else ""
        opt += " allow_ragged_batch: true" if ragged and -1 in dims else ""
        rows.append(
            f'  {{ name: "{name}" data_type: {TRITON_TYPES[dtype]} dims: [ {_dims(dims)} ]{opt} }}'
        )
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


# Every step after the first holds at most max_inflight requests (the first admits no more), so
# a later batched step's queue bounds are only a backstop (for max_inflight 0, or a stuck step).
# Its timeout counts from the request's arrival at the ensemble, so it allows the door's wait
# and then Triton's fixed 500 ms wait for a free instance at each later step whose instances a
# swap replaces (docs/benchmarks/serving_notes.md, section 11), with room to spare.
BACKSTOP_QUEUE_SIZE, BACKSTOP_EXTRA_MS = 1_000, 2_000


def step_config(step: type[Step], serving: ServingConfig) -> str:
    """A step's config: the python backend, its instances (``door_instances`` for the first
    step, ``instances`` for the others) and, for the door and the steps that share work across
    a batch, the dynamic batcher (batches of up to ``max_batch_size``) with its queue's bounds:
    the door's are ``max_queue_size`` and ``queue_timeout_ms`` (refused there in Triton, before
    any Python runs), a later step's a backstop (``BACKSTOP_QUEUE_SIZE``; the door's timeout
    plus ``BACKSTOP_EXTRA_MS``). The steps that take one request at a time (generators, select)
    have no batcher while the door limits the requests in flight (``max_inflight`` > 0), which
    bounds their queues: the batcher's only use there was the backstop, and Triton 2.51's
    batcher parks a request for 500 ms now and then when its instance is busy
    (serving_notes.md, section 12). A request stalled past the admission lease (2 s) frees its
    slot, so a stuck step can still gather more than ``max_inflight``."""
    door = step is STEPS[0]
    batch = serving.max_batch_size if step.SHARES_WORK else 1
    size = serving.max_queue_size if door else BACKSTOP_QUEUE_SIZE
    timeout_ms = serving.queue_timeout_ms + (0 if door else BACKSTOP_EXTRA_MS)
    batcher = (
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {serving.batch_delay_us}\n"
        "  default_queue_policy {\n"
        "    timeout_action: REJECT\n"
        f"    default_timeout_microseconds: {timeout_ms * 1000}\n"
        "    allow_timeout_override: false\n"
        f"    max_queue_size: {size}\n"
        "  }\n}\n"
    )
    instances = serving.door_instances if door else serving.instances
    return (
        f'name: "{step.MODEL}"\nbackend: "python"\nmax_batch_size: {batch}\n'
        "version_policy: { all { } }\n"
        + _tensors("input", step.INPUTS, ragged=True)
        + _tensors("output", step.OUTPUTS)
        + (
            batcher
            if step.BATCHER and (door or step.SHARES_WORK or not serving.max_inflight)
            else ""
        )
        + f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]\n"
    )


def ensemble_config(version: int) -> str:
    """The ``retrieve`` ensemble with every step pinned to ``version``: one user per request
    (batch 1; the steps batch concurrent requests themselves)."""
    ins = {n: FeaturesStep.INPUTS[n] for n in INPUTS}
    outs = {n: (dtype, [-1], False) for n, dtype in OUTPUTS.items()}
    steps = []
    for step in STEPS:
        maps = "".join(f'      input_map {{ key: "{n}" value: "{n}" }}\n' for n in step.INPUTS)
        maps += "".join(f'      output_map {{ key: "{n}" value: "{n}" }}\n' for n in step.OUTPUTS)
        steps.append(
            f'    {{\n      model_name: "{step.MODEL}"\n      model_version: {version}\n'
            f"{maps}    }}"
        )
    return (
        f'name: "{ENSEMBLE}"\nplatform: "ensemble"\nmax_batch_size: 1\n'
        + _tensors("input", ins)
        + _tensors("output", outs)
        + "ensemble_scheduling {\n  step [\n"
        + ",\n".join(steps)
        + "\n  ]\n}\n"
    )


# The checked-in definitions are rendered for this version with the default ServingConfig: what
# the first export of a registered model's version 1 with default flags writes.
DEFINITIONS_VERSION = 1
DEFINITIONS_DIR = REPO_ROOT / "serving" / "model_repository"
REGENERATE = "make serving-definitions"


def config_file(model: str) -> str:
    """A model's config, relative to the repository."""
    return f"{model}/config.pbtxt"


def model_file(model: str, version: int) -> str:
    """A step's python-backend shell, relative to the repository (the backend loads it from the
    version folder, so every version carries its own copy)."""
    return f"{model}/{version}/model.py"


def repository_definitions(
    version: int = DEFINITIONS_VERSION, serving: ServingConfig | None = None
) -> dict[str, str]:
    """Every file of the repository that is definition rather than asset, by path relative to
    the repository: the ensemble's and each step's ``config.pbtxt`` and each step's ``model.py``.

    The one generator of these files: ``publish`` writes them into every export and
    ``write_definitions`` into ``serving/model_repository``. Only ``version`` (the ensemble's
    pins, the shells' folder) and ``serving``'s instances, batch and queue settings vary by
    export.
    """
    serving = serving or ServingConfig()
    defs = {}
    for step in STEPS:
        defs[config_file(step.MODEL)] = step_config(step, serving)
        defs[model_file(step.MODEL, version)] = MODEL_PY.format(model=step.MODEL)
    defs[config_file(ENSEMBLE)] = ensemble_config(version)
    return dict(sorted(defs.items()))


def definition_drift(repository: Path, expected: dict[str, str], exact: bool = True) -> list[str]:
    """What in ``repository`` differs from ``expected`` (relative path -> text): missing and
    changed files, and with ``exact`` any other file (an exported repository also holds assets,
    older versions and bytecode, so its check is not exact)."""
    repository = Path(repository)
    drift = []
    for rel, text in expected.items():
        path = repository / rel
        if not path.is_file():
            drift.append(f"{rel}: missing")
        elif path.read_text() != text:
            drift.append(f"{rel}: differs from what candgen.endpoint.export generates")
    if exact and repository.is_dir():
        found = {p.relative_to(repository).as_posix() for p in repository.rglob("*") if p.is_file()}
        drift += [
            f"{rel}: not generated by candgen.endpoint.export"
            for rel in sorted(found - set(expected))
        ]
    return drift


def write_definitions(out: Path = DEFINITIONS_DIR) -> list[str]:
    """Rewrites ``out`` (by default ``serving/model_repository``) as exactly the definitions of
    ``repository_definitions()``; returns the paths written.

    Refuses a folder that holds an exported version (a ``serving.json``): its assets would go.
    """
    out = Path(out)
    if out.is_dir() and any(out.rglob(SERVING_FILE)):
        raise CandgenError(
            f"{out} holds an exported version; definitions go into their own "
            "folder (candgen serving export writes a repository)"
        )
    # Built beside it and swapped in, so a stale file (a step renamed since) does not survive.
    fresh = out.parent / f".{out.name}.fresh"
    shutil.rmtree(fresh, ignore_errors=True)
    defs = repository_definitions()
    for rel, text in defs.items():
        (fresh / rel).parent.mkdir(parents=True, exist_ok=True)
        (fresh / rel).write_text(text)
    shutil.rmtree(out, ignore_errors=True)
    fresh.rename(out)
    return list(defs)


def check_repository(repository: Path) -> list[str]:
    """What in an exported repository differs from the definitions this candgen generates for
    its pinned version and instance count: a repository exported by another candgen (another
    platform image) than the one serving it (the serving image) shows up here."""
    repository = Path(repository)
    version = pinned_version(repository)
    serving, _, _ = read_serving_file(repository / ENSEMBLE / str(version))
    return definition_drift(repository, repository_definitions(version, serving), exact=False)


def versions(repository: Path, model: str) -> list[int]:
    folder = Path(repository) / model
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def stage_generators(
    folder: Path,
    content: ContentGenerator,
    delivery: dict[str, np.ndarray],
) -> None:
    """Writes the content generator and the delivery state beside an already saved ads index."""
    content.save(folder / CONTENT_DIR)
    # allow_pickle as savez's default, named so that no key of delivery can be taken for it
    np.savez(folder / DELIVERY_FILE, allow_pickle=True, **delivery)


def stage_generative(
    folder: Path,
    generative_uri: str,
    ad_ids: np.ndarray,
    data_snapshot: str,
    depth: int,
    tracking_uri: str = "",
) -> dict[str, Any]:
    """Writes a registered generative model and the ads it may write (``ad_ids``) into the
    encoder step's ``folder``, loaded once as the step will load it; returns its lineage and
    how many of the ads it has an ID for.

    Raises:
        ConfigError: naming generative_uri, for a model that is not generative or was trained
            on another data snapshot than ``data_snapshot`` (the served model's); naming
            ad_ids, for one that knows none of the ads.
    """
    from candgen.index.build import registered_artifacts
    from candgen.models.saved import read_header
    from candgen.registry.tracking import resolve_version
    from candgen.serving.generative import GenerativeAds

    mv = resolve_version(generative_uri, tracking_uri)
    assert mv is not None  # ExportConfig accepts only models:/ URIs
    art = registered_artifacts(generative_uri, tracking_uri, "generative_uri")
    saved, _ = read_header(art / MODEL_FILE)
    if saved.model.model != "generative":
        raise ConfigError(
            "generative_uri",
            f"{generative_uri} is a {saved.model.model} model; the generative generator needs "
            "one trained with --model generative",
        )
    from candgen.features.text import EMBEDDING_DIM, MODEL_NAME

    check_query_width(saved.query_text_dim, EMBEDDING_DIM, MODEL_NAME)  # on the unified backbone
    theirs = mv.tags.get("data_snapshot", "")
    if theirs != data_snapshot:
        raise ConfigError(
            "generative_uri",
            f"{generative_uri} was trained on data snapshot {theirs!r}, the served model on "
            f"{data_snapshot!r}: their item ids need not mean the same items",
        )
    ads = np.asarray(ad_ids, np.int64)
    known = len(ads) - GenerativeAds.load(art / MODEL_FILE, ads, depth).unknown_ads
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(art / MODEL_FILE, folder / MODEL_FILE)
    np.save(folder / GENERATIVE_ADS_FILE, ads)
    return {
        "generative_model_uri": generative_uri,
        "generative_model_version": int(mv.version),
        "generative_run_id": mv.run_id,
        **{f"generative_{k}": mv.tags.get(k, "") for k in ("git_commit", "data_snapshot")},
        "generative_ads": known,
    }


def stage_query_encoder(folder: Path, precision: str = "int8") -> dict[str, Any]:
    """Writes the query encoder (all-MiniLM-L6-v2 as ONNX, ``candgen.endpoint.text_onnx``) into
    a features step's staged folder; returns its settings."""
    from candgen.endpoint.text_onnx import export_onnx

    return export_onnx(Path(folder) / QUERY_ENCODER_DIR, precision)


def staging_dir(repository: Path, version: int) -> Path:
    """Where a version is assembled before it moves in: beside the repository, on the same file
    system (so the move is a rename), and never inside it, where a server polling the repository
    would take the half-built folder for a model."""
    repository = Path(repository).resolve()
    return repository.parent / f".{repository.name}.staging-{version}"


def _replace_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` in one rename, and not at all when it is already there: a
    polling server reloads a model whenever one of its files changes."""
    if path.exists() and path.read_text() == text:
        return
    replace_atomically(path, lambda partial: partial.write_text(text))


def _install(
    repository: Path, src: Path, model: str, version: int, config: str, keep_versions: int
) -> None:
    """Moves a model's staged version folder ``src`` (its assets and ``serving.json``) into
    the repository with its python-backend shell, writes its ``config.pbtxt`` and prunes all
    but the newest ``keep_versions`` versions. An existing folder of the same version is
    replaced."""
    (src / "model.py").write_text(MODEL_PY.format(model=model))
    # Compiled here, because the python backend would otherwise write the bytecode into the
    # repository on its first load (it ignores PYTHONDONTWRITEBYTECODE), and a server
    # polling the repository takes any new file for a change and reloads the model.
    py_compile.compile(str(src / "model.py"), doraise=True)
    model_dir = repository / model
    model_dir.mkdir(parents=True, exist_ok=True)
    dst = model_dir / str(version)
    if dst.exists():
        shutil.rmtree(dst)
    src.rename(dst)
    _replace_text(repository / config_file(model), config)
    for old in versions(repository, model)[:-keep_versions]:
        shutil.rmtree(model_dir / str(old))


def publish(
    repository: Path,
    staging: Path,
    version: int,
    serving: ServingConfig,
    index: IndexConfig,
    provenance: dict[str, Any],
    keep_versions: int = 2,
) -> dict[str, Any]:
    """Moves a staged version (``staging/<step model>/`` folders) into the repository.

    Writes each step's ``serving.json`` and the definitions (``repository_definitions``: each
    ``model.py`` and ``config.pbtxt``, the ensemble pinned to ``version``), and prunes all but
    the newest ``keep_versions`` versions. An existing folder of the same version is replaced.
    Without ``serving.user_feature_refs``, the user feature service's references are resolved
    from the feature repository.
    """
    repository = Path(repository)
    defs = repository_definitions(version, serving)
    if not serving.user_feature_refs:
        from candgen.features.store import service_feature_refs

        refs = tuple(service_feature_refs(USER_SERVICE))
        serving = dataclasses.replace(serving, user_feature_refs=refs)
    for step in STEPS:
        src = staging / step.MODEL
        write_serving_file(src, serving, index, provenance)
        _install(repository, src, step.MODEL, version, defs[config_file(step.MODEL)], keep_versions)
    ensemble = repository / ENSEMBLE
    ensemble_version = ensemble / str(version)
    write_serving_file(ensemble_version, serving, index, provenance)
    for old in versions(repository, ENSEMBLE)[:-keep_versions]:
        shutil.rmtree(ensemble / str(old))
    _replace_text(repository / config_file(ENSEMBLE), defs[config_file(ENSEMBLE)])
    shutil.rmtree(staging, ignore_errors=True)
    return {"repository": str(repository), "version": version, **provenance}


def export_shards(
    ids: np.ndarray,
    vectors: np.ndarray,
    shards: int,
    out: Path,
    index: IndexConfig,
    serving: ServingConfig,
    provenance: dict[str, Any],
    version: int = 1,
    keep_versions: int = 2,
    progress: bool = False,
) -> dict[str, Any]:
    """Writes one Triton repository per shard of the ads index, ``out/shard-<i>``, each serving
    the ``candgen_ad_shard`` model over the ads whose id % ``shards`` is i, for
    ``candgen.serving.shards.ShardedIndex`` to ask. A shard answers up to ``max_k`` or
    ``MAX_FETCH`` ads, whichever is more (what an over-fetching caller asks for), and leaves
    eligibility to its caller. Each keeps ``keep_versions`` versions (the generators step of
    version v asks for version v). Each shard is built and installed like a step's version
    (``_install``): staged beside its repository and moved in, so a server polling it never
    loads a half-written index; a version already there is replaced, not atomically (export a
    new version instead while a server polls).

    Returns:
        A summary: index kind, ads, width, mean recall@100 of the shards (each against exact
        search over its own ads) and the repositories.
    """
    from candgen.index.build import index_recall

    ids = np.asarray(ids, np.int64)
    which = shard_of(ids, shards)
    serving = dataclasses.replace(serving, max_k=max(serving.max_k, MAX_FETCH))
    repositories, recalls, kinds = [], [], set()
    for shard in range(shards):
        rows = np.flatnonzero(which == shard)
        if not len(rows):
            raise ConfigError("ad_shard_urls", f"shard {shard} of {shards} would hold no ads")
        repository = Path(out) / f"shard-{shard}"
        staging = staging_dir(repository, version) / ShardStep.MODEL
        shutil.rmtree(staging.parent, ignore_errors=True)
        mine = np.asarray(vectors[rows], np.float32)  # one copy of the shard's vectors
        built = AdIndex.build(ids[rows], mine, index, progress=progress)
        recalls.append(index_recall(built, ids[rows], mine, min(100, len(rows)), 300))
        del mine
        kinds.add(built.kind)
        built.save(staging / INDEX_FILE)
        write_serving_file(
            staging, serving, index, {**provenance, "shard": shard, "shards": shards}
        )
        config = step_config(ShardStep, serving)
        _install(repository, staging, ShardStep.MODEL, version, config, keep_versions)
        shutil.rmtree(staging.parent, ignore_errors=True)
        repositories.append(repository)
    return {
        "kind": "/".join(sorted(kinds)),
        "size": len(ids),
        "dim": int(vectors.shape[1]),
        "recall_at_100": float(np.mean(recalls)),
        "shards": [str(r) for r in repositories],
    }


def ad_side(
    features_dir: Path, as_of: Any = None
) -> tuple[ContentGenerator, dict[str, np.ndarray], str]:
    """The content generator, the delivery state and the tables' snapshot hash, from the
    offline ad feature tables; with ``as_of`` (a timestamp), the delivery state as it stood
    then (what a replay of that day's requests must see)."""
    import pandas as pd

    manifest_path = features_dir / "manifest.json"
    if not manifest_path.exists():
        raise CandgenError(
            f"features_dir: {features_dir} holds no feature tables (run `candgen features build`)"
        )
    manifest = json.loads(manifest_path.read_text())
    if "categories" not in manifest:
        raise CandgenError(
            f"features_dir: {features_dir} was built before manifests named the "
            "categories; rebuild it with `candgen features build`"
        )
    cat_index = {c: i for i, c in enumerate(manifest["categories"])}
    attrs = pd.read_parquet(
        features_dir / "ad_attributes.parquet", columns=["ad_id", "category", "text_embedding"]
    )
    content = ContentGenerator(
        attrs["ad_id"].to_numpy(np.int64),
        np.stack(attrs["text_embedding"].to_numpy()).astype(np.float32),
        attrs["category"].map(cat_index).to_numpy(np.int64),
        len(cat_index),
    )
    delivery = pd.read_parquet(features_dir / "ad_delivery.parquet").sort_values(
        ["ad_id", "event_timestamp"], kind="stable"
    )
    if as_of is not None:
        delivery = delivery[delivery["event_timestamp"] < as_of]
    first = delivery.groupby("ad_id").first()
    last = delivery.groupby("ad_id").last()
    total = first["budget_remaining"].to_numpy(np.float64)
    remaining = last["budget_remaining"].to_numpy(np.float64)
    left = np.where(total > 0, remaining / np.maximum(total, 1e-9), 0.0)
    return (
        content,
        {
            "ad_ids": last.index.to_numpy(np.int64),
            "clicks": last["clicks_7d"].to_numpy(np.int64),
            "impressions": last["impressions_7d"].to_numpy(np.int64),
            "budget_left_fraction": left.astype(np.float32),
            "ineligible": last.index.to_numpy(np.int64)[last["status"].to_numpy() != "active"],
        },
        str(manifest.get("snapshot", "")),
    )


def delivery_state(campaign_delivery: Any, as_of: Any = None) -> DeliveryState:
    """Every campaign's newest delivery state (before ``as_of``, a timestamp) from a
    campaign_delivery table (a DataFrame).

    Raises:
        ConfigError: a campaign's targeting, status or throttle is malformed, naming the
            campaign and the field.
    """
    from candgen.features.build import check_campaign_targeting  # pandas: not in Triton's env
    from candgen.features.delivery import STATUSES

    delivery = campaign_delivery.sort_values(["campaign_id", "event_timestamp"], kind="stable")
    if as_of is not None:
        delivery = delivery[delivery["event_timestamp"] < as_of]
    last = delivery.groupby("campaign_id", sort=True).last()
    status = last["status"].to_numpy(object)
    throttle = last["throttle"].to_numpy(np.float64)
    bad_status = ~np.isin(status, STATUSES)
    if bad_status.any():
        at = int(np.argmax(bad_status))
        raise ConfigError(
            "status",
            f"campaign {int(last.index[at])}: must be one of {STATUSES}, got {status[at]!r}",
        )
    bad_throttle = ~((throttle >= 0) & (throttle <= 1))  # also refuses NaN
    if bad_throttle.any():
        at = int(np.argmax(bad_throttle))
        raise ConfigError(
            "throttle", f"campaign {int(last.index[at])}: must be in [0, 1], got {throttle[at]}"
        )
    return DeliveryState(
        last.index.to_numpy(np.int64),
        check_campaign_targeting(last.reset_index()),
        last["status"].to_numpy(object) == "active",
        last["throttle"].to_numpy(np.float32),
    )


def ad_constraints(
    features_dir: Path, content: ContentGenerator, serving: ServingConfig, as_of: Any = None
) -> tuple[AdTable, DeliveryState, AdCatalog]:
    """What the constraints read at serving time, from the offline feature tables: each ad's
    campaign and advertiser, every campaign's delivery state (targeting, status, throttle) as of
    ``as_of`` (default: the newest), and the ads' near-duplicate groups within each advertiser
    (their text embeddings at ``serving.duplicate_similarity``).

    Raises:
        ConfigError: a campaign's targeting is malformed, naming the campaign and the field.
    """
    import pandas as pd

    attrs = pd.read_parquet(
        features_dir / "ad_attributes.parquet", columns=["ad_id", "campaign_id", "advertiser_id"]
    )
    path = features_dir / "campaign_delivery.parquet"
    if not path.exists():
        raise CandgenError(
            f"features_dir: {features_dir} has no campaign_delivery table; rebuild it with "
            "`candgen features build`"
        )
    state = delivery_state(pd.read_parquet(path), as_of)
    ad_ids = attrs["ad_id"].to_numpy(np.int64)
    advertisers = attrs["advertiser_id"].to_numpy(np.int64)
    # An ad's own pause is its campaign's in this data: the campaign state covers it, and a
    # resumed campaign's ads come back with it.
    ads = AdTable(
        ad_ids, attrs["campaign_id"].to_numpy(np.int64), advertisers, np.zeros(0, np.int64)
    )
    vectors = content.text.take(ad_ids)  # zeros for an ad without text
    groups = duplicate_groups(advertisers, vectors, serving.duplicate_similarity)
    return ads, state, AdCatalog(ad_ids, advertisers, groups)


def _copy_index(index_dir: Path, dst: Path, model_uri: str) -> dict[str, Any]:
    """Takes over an index built by ``candgen index build`` for the same model URI."""
    manifest = index_dir / "index.json"
    if not manifest.exists():
        raise CandgenError(f"index_dir: {index_dir} holds no index.json (candgen index build)")
    summary: dict[str, Any] = json.loads(manifest.read_text())
    if summary["model_uri"] != model_uri:
        raise CandgenError(
            f"index_dir: {index_dir} was built for {summary['model_uri']}, not {model_uri}"
        )
    dst.mkdir(parents=True, exist_ok=True)
    for path in (index_dir / INDEX_FILE, ids_file(index_dir / INDEX_FILE), manifest):
        shutil.copy2(path, dst / path.name)
    return summary


def export(config: ExportConfig, progress: bool = True) -> dict[str, Any]:
    """Exports ``config.model_uri`` into ``config.out`` as version <registry version>.

    Returns:
        A summary: repository, version and the provenance written beside it.
    """
    from candgen.index.build import build_index, load_registered_embeddings
    from candgen.registry.tracking import resolve_version

    def say(msg: str) -> None:
        if progress:
            print(f"    {msg}", flush=True)

    features_dir = Path(config.features_dir)
    mv = resolve_version(config.model_uri, config.tracking_uri)
    assert mv is not None  # ExportConfig accepts only models:/ URIs
    version = int(mv.version)
    repository = Path(config.out)
    staging = staging_dir(repository, version)
    shutil.rmtree(staging, ignore_errors=True)
    t0 = time.perf_counter()
    emb = load_registered_embeddings(config.model_uri, config.tracking_uri)
    encoder = staging / EncoderStep.MODEL
    encoder.mkdir(parents=True)
    shutil.copy2(emb.model_dir / "model.pt", encoder / MODEL_FILE)
    shutil.copy2(emb.model_dir / "item_embeddings.npy", encoder / TABLE_FILE)
    say(f"{mv.name} v{version} (run {mv.run_id}): user encoder and item table")
    from candgen.features.text import EMBEDDING_DIM, MODEL_NAME
    from candgen.models.saved import read_header

    reads, _ = read_header(encoder / MODEL_FILE)
    check_query_width(reads.query_text_dim, EMBEDDING_DIM, MODEL_NAME)  # before the ONNX export
    query_model = stage_query_encoder(staging / FeaturesStep.MODEL, config.query_encoder_precision)
    say(
        f"query encoder: {query_model['model']} as ONNX ({query_model['dim']}-d, "
        f"{query_model['precision']})"
    )
    generators = staging / GeneratorsStep.MODEL
    generators.mkdir(parents=True, exist_ok=True)
    content, delivery, features_snapshot = ad_side(features_dir)
    if content.index.dim != query_model["dim"]:
        raise CandgenError(
            f"features_dir: the ads' text embeddings are {content.index.dim}-d, but the query "
            f"encoder ({query_model['model']}) gives {query_model['dim']}-d ones"
        )
    urls = config.serving.ad_shard_urls
    if urls:
        from candgen.data.synth import AD_ID_OFFSET
        from candgen.index.ann import ad_rows

        ids, vectors = ad_rows(emb.item_ids, emb.table, AD_ID_OFFSET)
        summary = export_shards(
            ids,
            vectors,
            len(urls),
            config.shards_dir,
            config.index,
            # a shard server admits what the generators step sends: no in-flight limit of its own
            dataclasses.replace(config.serving, max_inflight=0, ad_shard_urls=()),
            {"model_uri": config.model_uri, "model_version": version, "run_id": mv.run_id},
            version,
            config.keep_versions,
            progress,
        )
        say(f"ad index: {len(urls)} shards in {config.shards_dir}, for {', '.join(urls)}")
    elif config.index_dir:
        summary = _copy_index(Path(config.index_dir), generators, config.model_uri)
    else:
        summary = build_index(
            config.model_uri,
            generators,
            config.index,
            tracking_uri=config.tracking_uri,
            embeddings=emb,
        )
    recall = next(v for k, v in summary.items() if k.startswith("recall_at_"))
    say(
        f"ad index: {summary['kind']}, {summary['size']:,} ads x {summary['dim']}, "
        f"recall vs exact {recall:.4f}" + ("" if urls else " (logged to the run)")
    )
    stage_generators(generators, content, delivery)
    say(
        f"content generator: {len(content.text):,} ads' text embeddings; "
        f"{len(delivery['ineligible']):,} of {len(delivery['ad_ids']):,} ads ineligible now"
    )
    generative: dict[str, Any] = {}
    if config.generative_uri:
        generative = stage_generative(
            encoder / GENERATIVE_DIR,
            config.generative_uri,
            content.text.ids,
            mv.tags.get("data_snapshot", ""),
            config.serving.generative_depth,
            config.tracking_uri,
        )
        say(
            f"generative generator: {config.generative_uri} (run "
            f"{generative['generative_run_id']}) writes {generative['generative_ads']:,} of "
            f"{len(content.text):,} ads"
        )
    for step in STEPS:  # the steps with no assets of their own get an empty folder
        (staging / step.MODEL).mkdir(parents=True, exist_ok=True)
    ads, state, catalog = ad_constraints(features_dir, content, config.serving)
    save_eligibility(generators, ads, state)
    catalog.save(staging / SelectStep.MODEL)
    grouped = len(catalog) - len(np.unique(catalog.groups[catalog.groups >= 0]))
    say(
        f"constraints: {len(state.campaign_ids):,} campaigns' targeting and delivery state "
        f"({int((~state.active).sum()):,} not active, {int((state.throttles < 1).sum()):,} "
        f"throttled); {grouped:,} ads are near-duplicates of an ad of their advertiser"
    )
    quota_fit: dict[str, Any] = {}
    if config.quotas:
        learned = LearnedQuotas.load(Path(config.quotas))  # checked before it is installed
        learned.save(staging / SelectStep.MODEL / QUOTA_FILE)
        quota_fit = learned.fitted
        say(
            f"quotas: learned table fitted on {quota_fit.get('requests', '?')} logged "
            f"requests; policy {config.serving.effective_policy(True)}"
        )
    provenance = {
        "model_uri": config.model_uri,
        "model_name": mv.name,
        "model_version": version,
        "run_id": mv.run_id,
        **{k: mv.tags.get(k, "") for k in ("git_commit", "data_snapshot", "feature_service")},
        "features_snapshot": features_snapshot,
        "index_kind": summary["kind"],
        "index_recall": recall,
        "quota_policy": config.serving.effective_policy(bool(config.quotas)),
        "quotas_fitted_on": quota_fit.get("window", []),
        **generative,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = publish(
        repository, staging, version, config.serving, config.index, provenance, config.keep_versions
    )
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def install(source: Path, target: Path, keep_versions: int = 2) -> int:
    """Adds the version that ``source`` (an exported repository) is pinned to into ``target``
    (the repository a server reads), re-pinning its ensemble; returns the version.

    Nothing is loaded: ``swap`` does that once the files are in place.
    """
    source, target = Path(source), Path(target)
    version = pinned_version(source)
    serving, index, provenance = read_serving_file(source / ENSEMBLE / str(version))
    staging = staging_dir(target, version)
    shutil.rmtree(staging, ignore_errors=True)
    for step in STEPS:
        shutil.copytree(source / step.MODEL / str(version), staging / step.MODEL)
    publish(target, staging, version, serving, index, provenance, keep_versions)
    return version


def swap(
    url: str, repository: Path, protocol: str = "grpc", timeout_s: float = 600.0
) -> dict[str, Any]:
    """Loads the repository's pinned version into a running server without downtime.

    One load of the ensemble: Triton polls its steps with it, loads the changed ones first (the
    new version beside the one in use) and the ensemble, with its new pins, once they are all
    ready; it answers with the old ensemble until then. Loading the steps one by one would not
    do: each step's load makes Triton reload the ensemble that depends on it from its config,
    already pinned to the new version, so the new ensemble would serve before its other steps
    were loaded.

    ``url`` is the server's gRPC endpoint by default: Triton's HTTP server runs a load on the
    worker thread of the connection that asked for it, and every HTTP request on that thread
    waits until the load is done (a 3-6 s load stalled a quarter to half of the HTTP clients
    for as long, and a swap of the four steps outlasted a client's 10 s timeout); a load asked
    over gRPC stalls no HTTP or gRPC request (docs/benchmarks/serving_notes.md, section 10).
    The load may take ``timeout_s`` (every step of a large version loads within it).

    Raises:
        CandgenError: naming url, when the server refused the load or did not finish it in time.
    """
    from tritonclient.utils import InferenceServerException

    from candgen.endpoint.client import triton_client

    version = pinned_version(repository)
    client = triton_client(url, protocol, timeout_s)
    try:
        if protocol == "grpc":
            client.load_model(ENSEMBLE, client_timeout=timeout_s)
        else:
            client.load_model(ENSEMBLE)
    except InferenceServerException as e:
        # The server refused to load a step, or is not there: the user's server, not a bug.
        raise CandgenError(f"url: {url}: {e.message() or e}") from None
    except OSError as e:  # the HTTP client's timeout, or no server at all
        raise CandgenError(f"url: {url}: the load did not finish: {e!r}") from None
    return {"serving_version": version, "models": [s.MODEL for s in STEPS] + [ENSEMBLE]}


def main(argv: list[str] | None = None) -> int:
    """``definitions``: rewrite serving/model_repository (``make serving-definitions``);
    ``check REPOSITORY``: exit 1 when an exported repository's definitions are not this
    candgen's (the serving pods' init container runs it on the claim before Triton starts)."""
    parser = argparse.ArgumentParser(
        prog="python -m candgen.endpoint.export", description=main.__doc__
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser(
        "definitions", help="rewrite serving/model_repository from the code"
    ).add_argument("--out", type=Path, default=DEFINITIONS_DIR)
    sub.add_parser(
        "check", help="compare an exported repository's definitions with the code"
    ).add_argument("repository", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.action == "definitions":
            written = write_definitions(args.out)
            print(f"{args.out}: {len(written)} definition files")
            return 0
        drift = check_repository(args.repository)
    except CandgenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in drift:
        print(f"{args.repository}/{line}", file=sys.stderr)
    if drift:
        print(
            "the repository was exported by another candgen than this one: export it again "
            "with the platform image of this serving image's version",
            file=sys.stderr,
        )
        return 1
    print(
        f"{args.repository}: v{pinned_version(args.repository)} matches this candgen's definitions"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
