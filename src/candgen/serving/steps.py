"""The four steps of the ``retrieve`` ensemble, as plain functions of numpy tensors.

Each Triton python-backend model is a thin shell around one ``Step`` here (see
``triton_model.py``), so every step runs and is tested without Triton. A step's assets live in its
model's version folder: ``<repository>/<model>/<version>/``, written by ``export.py``.

    retrieve (ensemble)
      candgen_features      USER_ID, SCENARIO, K, RECENT_ITEM_IDS? -> HISTORY_IDS, HISTORY_TIMES,
                            AFFINITY, LONG_TERM, ACTIVITY, CONTEXT_FLAGS
                            (validates the request; Feast online)
      candgen_user_encoder  HISTORY_IDS, HISTORY_TIMES, LONG_TERM, SCENARIO -> USER_VECTOR
      candgen_generators    HISTORY_IDS, AFFINITY, USER_VECTOR, K
                            -> CANDIDATE_IDS, CANDIDATE_SCORES, CANDIDATE_SOURCES  (FAISS)
      candgen_select        CANDIDATE_*, SCENARIO, K, ACTIVITY, CONTEXT_FLAGS
                            -> AD_IDS, SCORES, SOURCES, FLAGS, SOURCE_NAMES, SOURCE_COUNTS,
                               QUOTA_POLICY  (the quota policy, dedup)

Empty tensors stand for "none": no times, no affinity, no long-term embedding, no user vector
(the encoder knew none of the history), no flags.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from candgen.errors import CandgenError, ConfigError
from candgen.features.client import FeatureServerClient
from candgen.index.ann import INDEX_FILE, AdIndex, IndexConfig
from candgen.serving.contract import check_k, parse_request
from candgen.serving.generators import ContentGenerator, PacingPopularity
from candgen.serving.pipeline import (
    COLD_START,
    FALLBACK,
    USER_SERVICE,
    FeatureSource,
    RetrievalPipeline,
    UserContext,
    generate,
    user_context,
    user_vector,
)
from candgen.serving.quota import (
    DEFAULT_WEIGHTS,
    POLICIES,
    QUOTA_FILE,
    Candidate,
    LearnedQuotas,
    QuotaConfig,
    QuotaPolicy,
    source_counts,
)

if TYPE_CHECKING:  # the retriever loads with the model, in load_retriever
    from candgen.models.retriever import Retriever

SERVING_FILE = "serving.json"
MODEL_FILE, TABLE_FILE = "model.pt", "item_embeddings.npy"
CONTENT_DIR, DELIVERY_FILE = "content", "delivery.npz"

Tensors = dict[str, np.ndarray]
# name -> (numpy dtype, Triton dims, optional)
Spec = dict[str, tuple[Any, list[int], bool]]


@dataclass(frozen=True)
class ServingConfig:
    """How the exported ensemble serves (written to every step's ``serving.json``).

    Attributes:
        feature_server_url: the Feast feature server the features step reads.
        feature_timeout_s: how long one feature lookup may take before the request falls back.
        max_k: the largest K a request may ask for.
        weights: the fixed policy's per-surface generator weights (surface -> generator ->
            share, summing to 1).
        instances: Triton instances of each python-backend step.
        user_feature_refs: the features of the user feature service (``view:feature``),
            resolved from the feature repository at export; empty: ask by service name.
        quota_policy: how the select step shares K among the generators: fixed (``weights``),
            learned (the learned table, ``quotas.json`` in the select step's folder), snake
            (snake merge), or auto: learned where the select step has a learned table, else
            fixed.
        quota_exploration: with the learned policy, mean (posterior means: deterministic) or
            thompson (a Thompson-sampling draw of the values per request).
        quota_overrides: surface -> generator -> share; such a surface uses these shares
            whatever the policy.
        quota_seed: the seed of the Thompson-sampling draws of each step instance.
    """

    feature_server_url: str = "http://127.0.0.1:6566"
    feature_timeout_s: float = 0.2
    max_k: int = 1_000
    weights: dict[str, dict[str, float]] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    instances: int = 1
    user_feature_refs: tuple[str, ...] = ()
    quota_policy: str = "auto"
    quota_exploration: str = "mean"
    quota_overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    quota_seed: int = 0

    def feature_client(self) -> FeatureServerClient:
        refs = {USER_SERVICE: list(self.user_feature_refs)} if self.user_feature_refs else {}
        return FeatureServerClient(self.feature_server_url, self.feature_timeout_s, refs)

    def __post_init__(self) -> None:
        if not self.feature_server_url.startswith(("http://", "https://")):
            raise ConfigError(
                "feature_server_url", f"must be an http(s) URL, got {self.feature_server_url!r}"
            )
        if self.feature_timeout_s <= 0:
            raise ConfigError("feature_timeout_s", f"must be > 0, got {self.feature_timeout_s}")
        if self.max_k < 1:
            raise ConfigError("max_k", f"must be >= 1, got {self.max_k}")
        if self.instances < 1:
            raise ConfigError("instances", f"must be >= 1, got {self.instances}")
        QuotaConfig(self.weights)  # validates the weights, naming the surface at fault
        if self.quota_policy not in ("auto", *POLICIES):
            raise ConfigError(
                "quota_policy", f"{self.quota_policy!r} is not one of {('auto', *POLICIES)}"
            )
        # Validates the overrides and the exploration (the learned table is checked where it is
        # read: at export, and when the select step loads).
        QuotaPolicy("fixed", self.quotas, self.quota_overrides, None, self.quota_exploration)

    @property
    def quotas(self) -> QuotaConfig:
        return QuotaConfig(self.weights)

    def effective_policy(self, has_table: bool) -> str:
        """The policy served: ``auto`` is learned with a learned table, else fixed."""
        if self.quota_policy == "auto":
            return "learned" if has_table else "fixed"
        return self.quota_policy

    def policy(self, folder: Path) -> QuotaPolicy:
        """The quota policy of the select step whose version folder is ``folder``."""
        table = Path(folder) / QUOTA_FILE
        learned = LearnedQuotas.load(table) if table.exists() else None
        return QuotaPolicy(
            self.effective_policy(learned is not None),
            self.quotas,
            self.quota_overrides,
            learned,
            self.quota_exploration,
        )


def write_serving_file(
    folder: Path, config: ServingConfig, index: IndexConfig, provenance: dict[str, Any]
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    body = {"serving": asdict(config), "index": asdict(index), "provenance": provenance}
    (folder / SERVING_FILE).write_text(json.dumps(body, indent=2) + "\n")


def read_serving_file(folder: Path) -> tuple[ServingConfig, IndexConfig, dict[str, Any]]:
    path = Path(folder) / SERVING_FILE
    if not path.exists():
        raise CandgenError(f"{path}: missing; export the repository with `candgen serving export`")
    body = json.loads(path.read_text())
    serving = dict(body["serving"], user_feature_refs=tuple(body["serving"]["user_feature_refs"]))
    return ServingConfig(**serving), IndexConfig(**body["index"]), body["provenance"]


def source_tensors(chosen: list[Candidate], flags: list[str], policy: str) -> Tensors:
    """The ensemble's outputs for the chosen candidates."""
    counts = source_counts(chosen)
    return {
        "AD_IDS": np.asarray([c.ad_id for c in chosen], dtype=np.int64),
        "SCORES": np.asarray([c.score for c in chosen], dtype=np.float32),
        "SOURCES": _bytes([c.source for c in chosen]),
        "FLAGS": _bytes(flags),
        "SOURCE_NAMES": _bytes(list(counts)),
        "SOURCE_COUNTS": np.asarray(list(counts.values()), dtype=np.int32),
        "QUOTA_POLICY": _bytes([policy]),
    }


def _bytes(values: list[str]) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=np.object_)


def _strings(values: np.ndarray | None) -> list[str]:
    if values is None:
        return []
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1)]


def _k(tensors: Tensors, max_k: int) -> int:
    k = int(np.asarray(tensors["K"]).reshape(-1)[0])
    check_k(k, max_k)
    return k


def context_tensors(context: UserContext) -> Tensors:
    return {
        "HISTORY_IDS": np.asarray(context.history, dtype=np.int64),
        "HISTORY_TIMES": np.asarray(context.times or [], dtype=np.float64),
        "AFFINITY": np.asarray(context.affinity or [], dtype=np.float32),
        "LONG_TERM": np.asarray(context.long_term or [], dtype=np.float32),
        "ACTIVITY": np.asarray([context.activity], dtype=np.int64),
        "CONTEXT_FLAGS": _bytes(context.flags),
    }


def context_from(tensors: Tensors) -> UserContext:
    times = tensors.get("HISTORY_TIMES")
    affinity = tensors.get("AFFINITY")
    long_term = tensors.get("LONG_TERM")
    activity = tensors.get("ACTIVITY")
    flags = set(_strings(tensors.get("CONTEXT_FLAGS")))
    return UserContext(
        history=np.asarray(tensors["HISTORY_IDS"], dtype=np.int64).tolist(),
        times=times.tolist() if times is not None and times.size else None,
        affinity=affinity.tolist() if affinity is not None and affinity.size else None,
        long_term=long_term.tolist() if long_term is not None and long_term.size else None,
        activity=int(activity.reshape(-1)[0]) if activity is not None and activity.size else 0,
        cold_start=COLD_START in flags,
        fallback=FALLBACK in flags,
    )


class Step:
    """One ensemble step: ``INPUTS``/``OUTPUTS`` give its Triton config; ``__call__`` runs it."""

    MODEL: ClassVar[str]
    INPUTS: ClassVar[Spec]
    OUTPUTS: ClassVar[Spec]

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.config, self.index_config, self.provenance = read_serving_file(self.folder)
        self.quotas = self.config.quotas

    def __call__(self, tensors: Tensors) -> Tensors:
        raise NotImplementedError


I64, F32, F64, STR = np.int64, np.float32, np.float64, np.object_


class FeaturesStep(Step):
    """Validates the request and reads the user's online features (Feast feature server)."""

    MODEL = "candgen_features"
    INPUTS: ClassVar[Spec] = {
        "USER_ID": (I64, [1], False),
        "SCENARIO": (STR, [1], False),
        "K": (np.int32, [1], False),
        "RECENT_ITEM_IDS": (I64, [-1], True),
    }
    OUTPUTS: ClassVar[Spec] = {
        "HISTORY_IDS": (I64, [-1], False),
        "HISTORY_TIMES": (F64, [-1], False),
        "AFFINITY": (F32, [-1], False),
        "LONG_TERM": (F32, [-1], False),
        "ACTIVITY": (I64, [1], False),
        "CONTEXT_FLAGS": (STR, [-1], False),
    }

    def __init__(self, folder: Path, features: FeatureSource | None = None) -> None:
        super().__init__(folder)
        self.features = features or self.config.feature_client()

    def __call__(self, tensors: Tensors) -> Tensors:
        request = parse_request(tensors, self.config.max_k)
        self.quotas.for_surface(request.scenario)
        context = user_context(self.features, request.user_id, request.recent_item_ids)
        return context_tensors(context)


def load_retriever(folder: Path) -> Retriever:
    """The registered version's user encoder and item table (as its pyfunc loads them)."""
    from candgen.models.factory import load_model
    from candgen.models.retriever import Retriever

    model, saved = load_model(Path(folder) / MODEL_FILE)
    table = np.load(Path(folder) / TABLE_FILE)
    return Retriever(model, saved.item_ids, table, saved.model.max_len)


class EncoderStep(Step):
    """The sequential model's user encoder (torch) over the history items it knows, for the
    request's surface (a contextual model, the unified one, conditions its query on it)."""

    MODEL = "candgen_user_encoder"
    INPUTS: ClassVar[Spec] = {
        "HISTORY_IDS": (I64, [-1], False),
        "HISTORY_TIMES": (F64, [-1], False),
        "LONG_TERM": (F32, [-1], False),
        "SCENARIO": (STR, [1], False),
    }
    OUTPUTS: ClassVar[Spec] = {"USER_VECTOR": (F32, [-1], False)}

    def __init__(self, folder: Path) -> None:
        import torch

        super().__init__(folder)
        # One request is one short sequence: intra-op threads only fight the other steps'
        # processes for the cores (0.72 vs 0.85 ms per request measured in-process, 2 cores).
        torch.set_num_threads(1)
        self.retriever = load_retriever(self.folder)

    def __call__(self, tensors: Tensors) -> Tensors:
        scenario = _strings(tensors["SCENARIO"])[0]
        vector = user_vector(self.retriever, context_from(tensors), scenario)
        return {"USER_VECTOR": vector if vector is not None else np.zeros(0, np.float32)}


@dataclass
class Generators:
    """The candidate generators of one exported version, with the ads ineligible now."""

    ad_index: AdIndex
    content: ContentGenerator
    popularity: PacingPopularity
    ineligible: frozenset[int]

    @classmethod
    def load(cls, folder: Path, index_config: IndexConfig) -> Generators:
        folder = Path(folder)
        delivery = np.load(folder / DELIVERY_FILE)
        return cls(
            ad_index=AdIndex.load(folder / INDEX_FILE, index_config),
            content=ContentGenerator.load(folder / CONTENT_DIR),
            popularity=PacingPopularity(
                delivery["ad_ids"],
                delivery["clicks"],
                delivery["impressions"],
                delivery["budget_left_fraction"],
            ),
            ineligible=frozenset(delivery["ineligible"].tolist()),
        )


class GeneratorsStep(Step):
    """ANN retrieval per candidate generator: sequential, content and popularity/pacing."""

    MODEL = "candgen_generators"
    INPUTS: ClassVar[Spec] = {
        "HISTORY_IDS": (I64, [-1], False),
        "AFFINITY": (F32, [-1], False),
        "USER_VECTOR": (F32, [-1], False),
        "K": (np.int32, [1], False),
    }
    OUTPUTS: ClassVar[Spec] = {
        "CANDIDATE_IDS": (I64, [-1], False),
        "CANDIDATE_SCORES": (F32, [-1], False),
        "CANDIDATE_SOURCES": (STR, [-1], False),
    }

    def __init__(self, folder: Path) -> None:
        import faiss

        super().__init__(folder)
        # One query per request: OpenMP threads only spin against the other steps' processes.
        faiss.omp_set_num_threads(1)
        self.generators = Generators.load(self.folder, self.index_config)

    def __call__(self, tensors: Tensors) -> Tensors:
        g = self.generators
        vector = np.asarray(tensors["USER_VECTOR"], dtype=np.float32)
        found = generate(
            context_from(tensors),
            vector if vector.size else None,
            _k(tensors, self.config.max_k),
            g.ad_index,
            g.content,
            g.popularity,
            g.ineligible,
        )
        rows = [(ad, score, source) for source, cands in found.items() for ad, score in cands]
        return {
            "CANDIDATE_IDS": np.asarray([r[0] for r in rows], dtype=np.int64),
            "CANDIDATE_SCORES": np.asarray([r[1] for r in rows], dtype=np.float32),
            "CANDIDATE_SOURCES": _bytes([r[2] for r in rows]),
        }


class SelectStep(Step):
    """Quota allocation across the generators for the request's context (surface and user
    activity) by the quota policy, with dedup; reports each generator's count."""

    MODEL = "candgen_select"
    INPUTS: ClassVar[Spec] = {
        "CANDIDATE_IDS": (I64, [-1], False),
        "CANDIDATE_SCORES": (F32, [-1], False),
        "CANDIDATE_SOURCES": (STR, [-1], False),
        "SCENARIO": (STR, [1], False),
        "K": (np.int32, [1], False),
        "ACTIVITY": (I64, [1], False),
        "CONTEXT_FLAGS": (STR, [-1], False),
    }
    OUTPUTS: ClassVar[Spec] = {
        "AD_IDS": (I64, [-1], False),
        "SCORES": (F32, [-1], False),
        "SOURCES": (STR, [-1], False),
        "FLAGS": (STR, [-1], False),
        "SOURCE_NAMES": (STR, [-1], False),
        "SOURCE_COUNTS": (np.int32, [-1], False),
        "QUOTA_POLICY": (STR, [1], False),
    }

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.policy = self.config.policy(self.folder)
        self.rng = np.random.default_rng(self.config.quota_seed)

    def __call__(self, tensors: Tensors) -> Tensors:
        scenario = _strings(tensors["SCENARIO"])[0]
        self.quotas.for_surface(scenario)
        candidates: dict[str, list[tuple[int, float]]] = {}
        ids = np.asarray(tensors["CANDIDATE_IDS"]).tolist()
        scores = np.asarray(tensors["CANDIDATE_SCORES"]).tolist()
        sources = _strings(tensors["CANDIDATE_SOURCES"])
        for ad, score, source in zip(ids, scores, sources, strict=True):
            candidates.setdefault(source, []).append((ad, score))
        activity = int(np.asarray(tensors.get("ACTIVITY", [0])).reshape(-1)[0])
        chosen = self.policy.select(
            candidates, scenario, activity, _k(tensors, self.config.max_k), self.rng
        )
        return source_tensors(
            chosen, _strings(tensors.get("CONTEXT_FLAGS")), self.policy.source(scenario)
        )


STEPS: tuple[type[Step], ...] = (FeaturesStep, EncoderStep, GeneratorsStep, SelectStep)
ENSEMBLE = "retrieve"


def pinned_version(repository: Path) -> int:
    """The version the repository's ensemble is pinned to (what a server loading it serves)."""
    import re

    path = Path(repository) / ENSEMBLE / "config.pbtxt"
    found = re.findall(r"model_version: (\d+)", path.read_text()) if path.exists() else []
    if not found:
        raise CandgenError(
            f"model_repository: {repository} holds no exported candgen version "
            "(run `candgen serving export`)"
        )
    return int(found[0])


def load_pipeline(
    repository: Path, version: int | None = None, features: FeatureSource | None = None
) -> RetrievalPipeline:
    """The exported version as one in-process ``RetrievalPipeline`` (offline retrieval on exactly
    what the ensemble serves)."""
    repository = Path(repository)
    version = version or pinned_version(repository)
    folder = {s.MODEL: repository / s.MODEL / str(version) for s in STEPS}
    config, index_config, _ = read_serving_file(folder[GeneratorsStep.MODEL])
    g = Generators.load(folder[GeneratorsStep.MODEL], index_config)
    return RetrievalPipeline(
        retriever=load_retriever(folder[EncoderStep.MODEL]),
        ad_index=g.ad_index,
        content=g.content,
        popularity=g.popularity,
        features=features or config.feature_client(),
        quotas=config.policy(folder[SelectStep.MODEL]),
        max_k=config.max_k,
        ineligible=g.ineligible,
        seed=config.quota_seed,
    )
