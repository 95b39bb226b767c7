"""The four steps of the ``retrieve`` ensemble, as plain functions of numpy tensors.

Each Triton python-backend model is a thin shell around one ``Step`` here (see
``triton_model.py``), so every step runs and is tested without Triton. A step's assets live in its
model's version folder: ``<repository>/<model>/<version>/``, written by ``export.py``.

    retrieve (ensemble)
      candgen_features      USER_ID, SCENARIO, K, RECENT_ITEM_IDS?, QUERY?, CONTEXT_ITEM_ID?
                            -> HISTORY_IDS, HISTORY_TIMES, AFFINITY, LONG_TERM, ACTIVITY,
                               CONTEXT_FLAGS, QUERY_EMBEDDING, CONTEXT_ITEM
                            (validates the request and fits its context to the surface; Feast;
                            the query's MiniLM embedding with ONNX Runtime)
      candgen_user_encoder  HISTORY_IDS, HISTORY_TIMES, LONG_TERM, SCENARIO, QUERY_EMBEDDING,
                            CONTEXT_ITEM -> USER_VECTOR, CONTEXT_VECTOR  (torch)
      candgen_generators    HISTORY_IDS, AFFINITY, USER_VECTOR, K, QUERY_EMBEDDING, CONTEXT_ITEM,
                            CONTEXT_VECTOR -> CANDIDATE_IDS, CANDIDATE_SCORES, CANDIDATE_SOURCES
                            (each candidate's generator as its place in GENERATORS),
                            CANDIDATE_FLAGS  (FAISS)
      candgen_select        CANDIDATE_*, SCENARIO, K, ACTIVITY, CONTEXT_FLAGS
                            -> AD_IDS, SCORES, SOURCES, FLAGS, SOURCE_NAMES, SOURCE_COUNTS,
                               QUOTA_POLICY  (the quota policy, dedup)

The query is embedded inside the features step, on a thread of its own while the feature lookup
waits on the feature server: a model that reads the query needs its embedding before it can
encode the user, so a step of its own would run in series and add a hop, and inside the encoder
step a cache miss added its whole cost to the request; beside the lookup most of it is hidden
(docs/benchmarks/serving_notes.md, sections 4 and 5).

Empty tensors stand for "none": no times, no affinity, no long-term embedding, no user vector
(the encoder knew none of the history), no query or context item (none, or not this surface's),
no query embedding, no context vector (the model does not know the item), no flags.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from candgen.errors import CandgenError, ConfigError
from candgen.features.client import FeatureServerClient
from candgen.index.ann import INDEX_FILE, AdIndex, IndexConfig
from candgen.serving.admission import Admission, InflightLimit, Overloaded, admission_tensor
from candgen.serving.contract import (
    UNKNOWN_CONTEXT_ITEM,
    Request,
    SurfaceContext,
    check_k,
    parse_request,
    surface_context,
)
from candgen.serving.diversity import AdCatalog, DiversityConfig
from candgen.serving.eligibility import (
    AD_INDEX,
    CONTENT_INDEX,
    PROFILE_FIELDS,
    DeliveryWatcher,
    Eligibility,
    FrequencyCaps,
    load_eligibility,
)
from candgen.serving.generators import ContentGenerator, PacingPopularity
from candgen.serving.pipeline import (
    COLD_START,
    FALLBACK,
    USER_SERVICE,
    FeatureSource,
    RetrievalPipeline,
    UserContext,
    check_context_item,
    context_item_vector,
    generate,
    request_eligibility,
    select,
    user_contexts,
    user_vectors,
    written_ads,
)
from candgen.serving.query_encoder import QUERY_ENCODER_DIR, TextEncoder
from candgen.serving.quota import (
    DEFAULT_WEIGHTS,
    GENERATORS,
    POLICIES,
    QUOTA_FILE,
    Candidate,
    LearnedQuotas,
    QuotaConfig,
    QuotaPolicy,
    source_counts,
)
from candgen.serving.shards import SHARD_MODEL, ShardedIndex, shard_of
from candgen.serving.updates import UpdateWatcher
from candgen.vocab import DEVICES, SURFACES

if TYPE_CHECKING:  # the retriever loads with the model, in load_retriever
    from candgen.models.retriever import Retriever
    from candgen.serving.generative import GenerativeAds
    from candgen.serving.query_encoder import QueryEncoder

SERVING_FILE = "serving.json"
# In the encoder step's folder: the generative model (model.pt) and the ads it may write.
GENERATIVE_DIR, GENERATIVE_ADS_FILE = "generative", "ad_ids.npy"
GENERATOR_CODES = {name: code for code, name in enumerate(GENERATORS)}
MODEL_FILE, TABLE_FILE = "model.pt", "item_embeddings.npy"
CONTENT_DIR, DELIVERY_FILE = "content", "delivery.npz"

log = logging.getLogger(__name__)
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
        instances: Triton instances of each python-backend step after the first.
        door_instances: Triton instances of the first step (features, the door). Triton
            2.51's dynamic batcher, when every instance is busy, can park a queued request for
            its fixed 500 ms wait; under overload that set the answered requests' latency at the
            door (docs/benchmarks/serving_notes.md, section 12). The step is light (a feature
            read, the query encoder: 158 MB a process at 1M ads), so several cost little memory;
            each keeps its own query cache, so a repeated query hits only where it was first
            embedded.
        max_batch_size: the most requests one execute of the features and encoder steps takes
            together: Triton's dynamic batcher hands such a step what queued while it ran, and
            it shares work across them (one feature read, one encoder forward); the other steps
            take one request at a time (``Step.SHARES_WORK``).
        batch_delay_us: how long a step's batcher may hold a request to let a batch fill
            (microseconds; 0: batch only what is already waiting).
        max_queue_size: requests the first step (the door) holds waiting; past it Triton refuses
            a request at once (UNAVAILABLE: retry later or elsewhere).
        queue_timeout_ms: a request that waited this long at the door is refused (UNAVAILABLE),
            which bounds how long an answered request waits to get in.
        max_inflight: requests the ensemble holds at once; the features step refuses the next
            ones (UNAVAILABLE) before any step has worked on them, so that the answered ones
            keep a bounded latency (0: no limit; candgen.serving.admission).
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
        query_cache_size: recent search queries whose embeddings each instance of the features
            step keeps (an LRU cache; 0: none).
        query_encoder_threads: ONNX Runtime threads for one query's embedding (a cache miss).
        frequency_cap: impressions of one ad one user may get in a UTC day.
        advertiser_frequency_cap: impressions of one advertiser's ads one user may get in a day.
        delivery_poll_s: how often the generators step asks the online store whether the
            delivery state (pauses, budgets, throttles, targeting) changed (0: never; the
            export's state then holds).
        max_ads_per_advertiser: per surface (home, search, related), at most this many ads of
            one advertiser in each ``advertiser_window`` ads of an answer.
        advertiser_window: the window (in ads) that ``max_ads_per_advertiser`` applies to.
        duplicate_similarity: two ads of one advertiser whose text embeddings have at least
            this cosine similarity are near-duplicates: an answer keeps the better-ranked one
            (1.0: keep both).
        enforce_constraints: enforce targeting, live delivery state, frequency caps, hidden
            advertisers and advertiser diversity (false: only the export's ineligible ads are
            left out; for measuring what the constraints cost, never for live traffic).
        encoder_device: where the encoder step runs the user encoder: cpu, cuda (a GPU torch
            sees; the step refuses to load without one) or auto (cuda where there is one).
        ad_shard_urls: the ads index's shards (``candgen.serving.shards``), each a gRPC
            endpoint (host:port) serving ``candgen_ad_shard``, shard i at position i; the
            generators step asks them all and merges, instead of holding the index itself
            (empty: it holds the index).
        ad_shard_timeout_s: how long one shard may take to answer.
        ad_updates_dir: a folder of catalogue updates (``candgen.serving.updates``: new ads
            with their vectors, expired ads) that whoever holds the ads index (the generators
            step, or each shard) applies as they arrive, without a rebuild (empty: none).
        ad_updates_poll_s: how often that folder is looked at.
        generative_depth: ads the generative generator (a version exported with a generative
            model) writes per request, in the encoder step: more than an answer takes from it,
            since the generators step then drops the ads the request may not be shown.
    """

    feature_server_url: str = "http://127.0.0.1:6566"
    feature_timeout_s: float = 0.2
    max_k: int = 1_000
    weights: dict[str, dict[str, float]] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    instances: int = 1
    door_instances: int = 4
    max_batch_size: int = 32
    batch_delay_us: int = 0
    max_queue_size: int = 8
    queue_timeout_ms: int = 1_000
    max_inflight: int = 4
    user_feature_refs: tuple[str, ...] = ()
    quota_policy: str = "auto"
    quota_exploration: str = "mean"
    quota_overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    quota_seed: int = 0
    query_cache_size: int = 10_000
    query_encoder_threads: int = 1
    frequency_cap: int = 3
    advertiser_frequency_cap: int = 10
    delivery_poll_s: float = 0.1
    max_ads_per_advertiser: tuple[int, ...] = (3, 3, 3)
    advertiser_window: int = 20
    duplicate_similarity: float = 0.92
    enforce_constraints: bool = True
    encoder_device: str = "cpu"
    ad_shard_urls: tuple[str, ...] = ()
    ad_shard_timeout_s: float = 0.5
    ad_updates_dir: str = ""
    ad_updates_poll_s: float = 1.0
    generative_depth: int = 400  # twice the largest K measured (200): room for what is dropped

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
        for name, low, high in (
            ("instances", 1, 1_024),
            ("door_instances", 1, 1_024),
            ("max_batch_size", 1, 1_024),
            ("batch_delay_us", 0, 1_000_000),
            ("max_queue_size", 1, 100_000),
            ("queue_timeout_ms", 1, 60_000),
            ("max_inflight", 0, 100_000),
            ("generative_depth", 1, 100_000),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(name, f"must be an integer in [{low}, {high}], got {value!r}")
        if self.query_cache_size < 0:
            raise ConfigError("query_cache_size", f"must be >= 0, got {self.query_cache_size}")
        if self.query_encoder_threads < 1:
            raise ConfigError(
                "query_encoder_threads", f"must be >= 1, got {self.query_encoder_threads}"
            )
        FrequencyCaps(self.frequency_cap, self.advertiser_frequency_cap)  # validates the caps
        poll = self.delivery_poll_s
        if isinstance(poll, bool) or not (isinstance(poll, int | float) and 0 <= poll <= 60):
            raise ConfigError("delivery_poll_s", f"must be seconds in [0, 60], got {poll!r}")
        for url in self.ad_shard_urls:
            host, _, port = str(url).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError("ad_shard_urls", f"expected host:port, got {url!r}")
        for name in ("ad_shard_timeout_s", "ad_updates_poll_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int | float) and value > 0):
                raise ConfigError(name, f"must be seconds > 0, got {value!r}")
        if self.encoder_device not in DEVICES:
            raise ConfigError("encoder_device", f"{self.encoder_device!r} is not one of {DEVICES}")
        if not isinstance(self.enforce_constraints, bool):
            raise ConfigError(
                "enforce_constraints", f"must be true or false, got {self.enforce_constraints!r}"
            )
        caps = self.max_ads_per_advertiser
        if not isinstance(caps, tuple | list) or len(caps) != len(SURFACES):
            raise ConfigError(
                "max_ads_per_advertiser",
                f"needs one cap per surface {SURFACES}, got {self.max_ads_per_advertiser!r}",
            )
        for surface in SURFACES:
            self.diversity(surface)  # validates the cap, the window and the similarity
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

    @property
    def caps(self) -> FrequencyCaps:
        return FrequencyCaps(self.frequency_cap, self.advertiser_frequency_cap)

    def diversity(self, surface: str) -> DiversityConfig:
        """The advertiser cap and near-duplicate collapse of one surface."""
        cap = self.max_ads_per_advertiser[SURFACES.index(surface)]
        try:
            return DiversityConfig(cap, self.advertiser_window, self.duplicate_similarity)
        except ConfigError as e:
            field_name = "max_ads_per_advertiser" if e.field == "max_per_advertiser" else e.field
            field_name = "advertiser_window" if field_name == "window" else field_name
            raise ConfigError(field_name, f"{surface}: {str(e).split(': ', 1)[1]}") from None

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
    if "max_ads_per_advertiser" in serving:
        serving["max_ads_per_advertiser"] = tuple(serving["max_ads_per_advertiser"])
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


def source_codes(names: list[str]) -> np.ndarray:
    """Generator names as their places in ``GENERATORS``: between the generators and the select
    step hundreds of candidates each carry their generator, and a BYTES tensor is serialised
    and parsed element by element in Python by the python backend (1.7 ms for 700, measured)."""
    return np.fromiter((GENERATOR_CODES[n] for n in names), dtype=np.int32, count=len(names))


def source_names(codes: np.ndarray) -> list[str]:
    """What ``source_codes`` encoded.

    Raises:
        ConfigError: naming CANDIDATE_SOURCES, for a code that is no generator's.
    """
    values = np.asarray(codes).reshape(-1)
    if values.size and (values.min() < 0 or values.max() >= len(GENERATORS)):
        raise ConfigError(
            "CANDIDATE_SOURCES", f"generator codes are 0..{len(GENERATORS) - 1} ({GENERATORS})"
        )
    return [GENERATORS[c] for c in values.tolist()]


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


def context_tensors(context: UserContext, extra_flags: tuple[str, ...] = ()) -> Tensors:
    return {
        "HISTORY_IDS": np.asarray(context.history, dtype=np.int64),
        "HISTORY_TIMES": np.asarray(context.times or [], dtype=np.float64),
        "AFFINITY": np.asarray(context.affinity or [], dtype=np.float32),
        "LONG_TERM": np.asarray(context.long_term or [], dtype=np.float32),
        "ACTIVITY": np.asarray([context.activity], dtype=np.int64),
        "CONTEXT_FLAGS": _bytes([*context.flags, *extra_flags]),
        "AUDIENCE": _bytes([context.profile.get(f) or "" for f in PROFILE_FIELDS]),
        "BLOCKED_AD_IDS": np.asarray(context.blocked_ads, dtype=np.int64),
        "BLOCKED_ADVERTISER_IDS": np.asarray(context.blocked_advertisers, dtype=np.int64),
    }


def _optional_vector(tensors: Tensors, name: str) -> np.ndarray | None:
    value = tensors.get(name)
    return np.asarray(value, dtype=np.float32) if value is not None and value.size else None


def _optional_item(tensors: Tensors) -> int | None:
    value = tensors.get("CONTEXT_ITEM")
    return int(np.asarray(value).reshape(-1)[0]) if value is not None and value.size else None


def context_from(tensors: Tensors) -> UserContext:
    times = tensors.get("HISTORY_TIMES")
    affinity = tensors.get("AFFINITY")
    long_term = tensors.get("LONG_TERM")
    activity = tensors.get("ACTIVITY")
    flags = set(_strings(tensors.get("CONTEXT_FLAGS")))
    audience = _strings(tensors.get("AUDIENCE"))
    blocked = tensors.get("BLOCKED_AD_IDS")
    blocked_advertisers = tensors.get("BLOCKED_ADVERTISER_IDS")
    return UserContext(
        history=np.asarray(tensors["HISTORY_IDS"], dtype=np.int64).tolist(),
        times=times.tolist() if times is not None and times.size else None,
        affinity=affinity.tolist() if affinity is not None and affinity.size else None,
        long_term=long_term.tolist() if long_term is not None and long_term.size else None,
        activity=int(activity.reshape(-1)[0]) if activity is not None and activity.size else 0,
        cold_start=COLD_START in flags,
        fallback=FALLBACK in flags,
        profile={
            f: (audience[i] or None) if i < len(audience) else None
            for i, f in enumerate(PROFILE_FIELDS)
        },
        blocked_ads=np.asarray(blocked if blocked is not None else [], np.int64).tolist(),
        blocked_advertisers=np.asarray(
            blocked_advertisers if blocked_advertisers is not None else [], np.int64
        ).tolist(),
    )


class Step:
    """One ensemble step: ``INPUTS``/``OUTPUTS`` give its Triton config; ``__call__`` runs it.

    ``SHARES_WORK``: whether ``batch`` does less work per request for a larger batch (one feature
    read, one encoder forward). Such a step gets up to ``ServingConfig.max_batch_size`` requests
    per execute; another gets one at a time, since the python backend answers a batch only when
    all of it is done, so the first request of a batch would wait for the others for nothing.
    """

    MODEL: ClassVar[str]
    INPUTS: ClassVar[Spec]
    OUTPUTS: ClassVar[Spec]
    SHARES_WORK: ClassVar[bool] = False
    BATCHER: ClassVar[bool] = True  # whether the step may get Triton's dynamic batcher at all
    # The server's in-flight limit (set by the Triton shell; None in-process): the features step
    # admits a request into the ensemble or refuses it; the shell lets it out after the select
    # step, or after the step that answered it with an error.
    admission: InflightLimit | None = None

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.config, self.index_config, self.provenance = read_serving_file(self.folder)
        self.quotas = self.config.quotas

    def __call__(self, tensors: Tensors) -> Tensors:
        return answer_one(self.batch([tensors])[0])

    def batch(self, requests: list[Tensors]) -> list[Tensors | Exception]:
        """The outputs of each request of a batch (what Triton's dynamic batcher hands one
        execute), in order; a request that fails gets its error in its place, so one bad request
        never fails the others. Steps that share work across a batch override this."""
        raise NotImplementedError


def answer_one(answer: Tensors | Exception) -> Tensors:
    """A request's outputs; raises the error it got instead."""
    if isinstance(answer, Exception):
        raise answer
    return answer


def each(requests: list[Tensors], one: Callable[[Tensors], Tensors]) -> list[Tensors | Exception]:
    """``one`` applied to every request of a batch, each request's error kept in its place."""
    answers: list[Tensors | Exception] = []
    for tensors in requests:
        try:
            answers.append(one(tensors))
        except Exception as e:  # this request's answer, not the batch's
            answers.append(e)
    return answers


I64, F32, F64, STR = np.int64, np.float32, np.float64, np.object_


class FeaturesStep(Step):
    """Validates the request and reads the user's online features (Feast feature server)."""

    MODEL = "candgen_features"
    SHARES_WORK = True
    INPUTS: ClassVar[Spec] = {
        "USER_ID": (I64, [1], False),
        "SCENARIO": (STR, [1], False),
        "K": (np.int32, [1], False),
        "RECENT_ITEM_IDS": (I64, [-1], True),
        "QUERY": (STR, [1], True),
        "CONTEXT_ITEM_ID": (I64, [1], True),
    }
    OUTPUTS: ClassVar[Spec] = {
        "HISTORY_IDS": (I64, [-1], False),
        "HISTORY_TIMES": (F64, [-1], False),
        "AFFINITY": (F32, [-1], False),
        "LONG_TERM": (F32, [-1], False),
        "ACTIVITY": (I64, [1], False),
        "CONTEXT_FLAGS": (STR, [-1], False),
        "QUERY_EMBEDDING": (F32, [-1], False),
        "CONTEXT_ITEM": (I64, [-1], False),
        "AUDIENCE": (STR, [3], False),
        "BLOCKED_AD_IDS": (I64, [-1], False),
        "BLOCKED_ADVERTISER_IDS": (I64, [-1], False),
        "ADMISSION": (I64, [2], False),
    }

    def __init__(
        self,
        folder: Path,
        features: FeatureSource | None = None,
        query_encoder: TextEncoder | None = None,
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        super().__init__(folder)
        self.features = features or self.config.feature_client()
        self.query_encoder = (
            query_encoder
            if query_encoder is not None
            else load_query_encoder(self.folder, self.config)
        )
        # One worker: the encoder's cache is only ever touched from this thread.
        self._embedding = ThreadPoolExecutor(1, thread_name_prefix="query-encoder")

    def batch(self, requests: list[Tensors]) -> list[Tensors | Exception]:
        """Every user's features in one read of the store; the batch's search queries embedded
        one by one (a padded batch would let one query's vector depend on its neighbours) on the
        encoder's thread meanwhile."""
        answers: list[Tensors | Exception] = list(requests)  # each replaced below
        parsed: list[tuple[int, Request, SurfaceContext]] = []
        for row, tensors in enumerate(requests):
            try:
                request = parse_request(tensors, self.config.max_k)
                self.quotas.for_surface(request.scenario)
                surface = surface_context(request.scenario, request.query, request.context_item_id)
                parsed.append((row, request, surface))
            except Exception as e:  # this request's error
                answers[row] = e
        grants = self.admission.admit(len(parsed)) if self.admission else [None] * len(parsed)
        admitted: list[tuple[int, Request, SurfaceContext, Admission | None]] = []
        for (row, request, surface), grant in zip(parsed, grants, strict=True):
            if self.admission is not None and grant is None:
                answers[row] = Overloaded(
                    f"the server is at its limit of {self.config.max_inflight} requests in "
                    "flight (max_inflight); retry later"
                )
            else:
                admitted.append((row, request, surface, grant))
        try:
            self._answer(admitted, answers)
        finally:  # a request that goes no further leaves at once, whatever went wrong
            if self.admission is not None:
                self.admission.release(
                    [a for row, _, _, a in admitted if a and not isinstance(answers[row], dict)]
                )
        return answers

    def _answer(
        self,
        admitted: list[tuple[int, Request, SurfaceContext, Admission | None]],
        answers: list[Tensors | Exception],
    ) -> None:
        queries = [surface.query for _, _, surface, _ in admitted]
        # ONNX Runtime and the lookup's socket wait both release the GIL, so the cache misses
        # run while the store answers (measured: +0.7 ms instead of +3 ms at p50).
        pending = (
            self._embedding.submit(self._embed, queries)
            if any(q is not None for q in queries)
            else None
        )
        try:
            contexts = user_contexts(
                self.features,
                [(request.user_id, request.recent_item_ids) for _, request, _, _ in admitted],
                self.config.caps,
            )
        except Exception as e:
            if pending is not None:
                pending.cancel()  # not yet started: the next batch's queries go first
            for row, _, _, _ in admitted:
                answers[row] = e
            return
        embeddings = pending.result() if pending is not None else [None] * len(admitted)
        for (row, _, surface, grant), context, embedding in zip(
            admitted, contexts, embeddings, strict=True
        ):
            if isinstance(context, Exception):
                answers[row] = context
            elif isinstance(embedding, Exception):
                answers[row] = embedding
            else:
                item = surface.context_item
                answers[row] = context_tensors(context, surface.flags) | {
                    "QUERY_EMBEDDING": _empty(embedding),
                    "CONTEXT_ITEM": np.asarray([item] if item is not None else [], np.int64),
                    "ADMISSION": admission_tensor(grant),
                }

    def _embed(self, queries: list[str | None]) -> list[np.ndarray | Exception | None]:
        out: list[np.ndarray | Exception | None] = []
        for query in queries:
            try:
                out.append(self.query_encoder.encode(query) if query is not None else None)
            except Exception as e:  # this request's error
                out.append(e)
        return out


def written_of(tensors: Tensors) -> tuple[np.ndarray, np.ndarray] | None:
    """The generative generator's ads and scores as the encoder step sent them (None: none)."""
    ids = tensors.get("GENERATED_IDS")
    if ids is None or not ids.size:
        return None
    scores = tensors.get("GENERATED_SCORES")
    if scores is None or scores.shape != ids.shape:
        raise ConfigError("GENERATED_SCORES", "needs one score per GENERATED_IDS entry")
    return np.asarray(ids, np.int64).ravel(), np.asarray(scores, np.float32).ravel()


def load_retriever(folder: Path, device: str = "cpu") -> Retriever:
    """The registered version's user encoder and item table (as its pyfunc loads them), the
    encoder on ``device`` (``ServingConfig.encoder_device``).

    Raises:
        ConfigError: naming encoder_device, for cuda where torch sees no GPU.
    """
    from candgen.models.factory import load_model
    from candgen.models.retriever import Retriever, torch_device

    where = torch_device(device, "encoder_device")  # before the weights are read
    model, saved = load_model(Path(folder) / MODEL_FILE)
    table = np.load(Path(folder) / TABLE_FILE, mmap_mode="r")  # read by the rows looked up
    return Retriever(model, saved.item_ids, table, saved.model.max_len, where)


def load_generative(folder: Path, config: ServingConfig) -> GenerativeAds | None:
    """The version's generative generator (``generative/`` in the encoder step's folder: the
    model and the ads it may write), or None where it was exported without one."""
    where = Path(folder) / GENERATIVE_DIR
    if not where.is_dir():
        return None
    from candgen.serving.generative import GenerativeAds

    ads = np.load(where / GENERATIVE_ADS_FILE)
    return GenerativeAds.load(
        where / MODEL_FILE, ads, config.generative_depth, config.encoder_device
    )


def load_query_encoder(folder: Path, config: ServingConfig) -> QueryEncoder:
    """The version's query encoder (``query_encoder/`` in the features step's folder)."""
    from candgen.serving.query_encoder import QueryEncoder

    return QueryEncoder(
        Path(folder) / QUERY_ENCODER_DIR, config.query_cache_size, config.query_encoder_threads
    )


def check_query_width(model_width: int, encoder_dim: int, encoder_model: str) -> None:
    """A model that reads query text (``model_width`` > 0) must read the query encoder's width.

    Export checks it before it writes a version, and ``load_pipeline`` when it loads one; in the
    ensemble a mismatched embedding is refused per request (``Retriever``, naming ``queries``).
    """
    if model_width and model_width != encoder_dim:
        raise CandgenError(
            f"query encoder: the model reads {model_width}-d query embeddings, but "
            f"{encoder_model} gives {encoder_dim}-d ones"
        )


def _empty(vector: np.ndarray | None) -> np.ndarray:
    return vector if vector is not None else np.zeros(0, np.float32)


class EncoderStep(Step):
    """The sequential model's user encoder (torch) over the history items it knows, for the
    request's surface and its context (a contextual model conditions its query on them, the
    search query's embedding among them); looks up the context item's vector. In a version
    exported with a generative model, that model writes the user's ads too (``GENERATED_IDS``,
    best first, and their scores: log-probabilities, or a dense head's; empty otherwise)."""

    MODEL = "candgen_user_encoder"
    SHARES_WORK = True
    INPUTS: ClassVar[Spec] = {
        "HISTORY_IDS": (I64, [-1], False),
        "HISTORY_TIMES": (F64, [-1], False),
        "LONG_TERM": (F32, [-1], False),
        "SCENARIO": (STR, [1], False),
        "QUERY_EMBEDDING": (F32, [-1], False),
        "CONTEXT_ITEM": (I64, [-1], False),
        "ADMISSION": (I64, [2], True),
    }
    OUTPUTS: ClassVar[Spec] = {
        "USER_VECTOR": (F32, [-1], False),
        "CONTEXT_VECTOR": (F32, [-1], False),
        "GENERATED_IDS": (I64, [-1], False),
        "GENERATED_SCORES": (F32, [-1], False),
    }

    def __init__(self, folder: Path) -> None:
        import torch

        super().__init__(folder)
        # One request is one short sequence: intra-op threads only fight the other steps'
        # processes for the cores (0.72 vs 0.85 ms per request measured in-process, 2 cores).
        torch.set_num_threads(1)
        self.retriever = load_retriever(self.folder, self.config.encoder_device)
        self.generative = load_generative(self.folder, self.config)

    def _written(
        self,
        contexts: list[UserContext],
        scenarios: list[str],
        queries: list[np.ndarray | None],
        items: list[int | None],
    ) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """The generative generator's ads for the batch; none where it fails, so that the
        requests are answered by the other generators (the failure is logged)."""
        if self.generative is None:
            return [None] * len(contexts)
        try:
            return written_ads(self.generative, contexts, scenarios, queries, items)
        except Exception:
            log.exception("generative generator failed; answering without it")
            return [None] * len(contexts)

    def batch(self, requests: list[Tensors]) -> list[Tensors | Exception]:
        """One encoder forward for the batch (two where some histories carry timestamps and
        others none); should it fail, each request alone, so that the error is its own. The
        generative generator's ads ride along (``_written``)."""
        try:
            contexts = [context_from(t) for t in requests]
            items = [_optional_item(t) for t in requests]
            scenarios = [_strings(t["SCENARIO"])[0] for t in requests]
            queries = [_optional_vector(t, "QUERY_EMBEDDING") for t in requests]
            vectors = user_vectors(self.retriever, contexts, scenarios, queries, items)
        except Exception as e:
            if len(requests) == 1:
                return [e]
            return [answer for t in requests for answer in self.batch([t])]
        written = self._written(contexts, scenarios, queries, items)
        return [
            {
                "USER_VECTOR": _empty(vector),
                "CONTEXT_VECTOR": _empty(context_item_vector(self.retriever, item)),
                "GENERATED_IDS": ads[0] if ads is not None else np.zeros(0, np.int64),
                "GENERATED_SCORES": ads[1] if ads is not None else np.zeros(0, np.float32),
            }
            for vector, item, ads in zip(vectors, items, written, strict=True)
        ]


@dataclass
class Generators:
    """The candidate generators of one exported version, with the ads ineligible now and the
    per-request eligibility over their indexes."""

    ad_index: AdIndex | ShardedIndex
    content: ContentGenerator
    popularity: PacingPopularity
    ineligible: frozenset[int]
    eligibility: Eligibility

    @classmethod
    def load(
        cls, folder: Path, index_config: IndexConfig, config: ServingConfig | None = None
    ) -> Generators:
        """The version's generators; with ``config.ad_shard_urls`` the ads index is its shards'
        servers, asked for this same version (the folder's name)."""
        folder = Path(folder)
        config = config or ServingConfig()
        delivery = np.load(folder / DELIVERY_FILE)
        # The version's search settings apply to its text index too (its kind is its own, and
        # it stays on the CPU): at 10M ads its IVF's default 32 cells were a third of the step.
        content = ContentGenerator.load(folder / CONTENT_DIR, index_config.searching())
        ad_index: AdIndex | ShardedIndex
        indexes: dict[str, AdIndex] = {CONTENT_INDEX: content.index}
        if config.ad_shard_urls:
            version = int(folder.name) if folder.name.isdigit() else 0
            ad_index = ShardedIndex(config.ad_shard_urls, config.ad_shard_timeout_s, version)
        else:
            ad_index = AdIndex.load(folder / INDEX_FILE, index_config)
            indexes[AD_INDEX] = ad_index
        ads, state = load_eligibility(folder)
        return cls(
            ad_index=ad_index,
            content=content,
            popularity=PacingPopularity(
                delivery["ad_ids"],
                delivery["clicks"],
                delivery["impressions"],
                delivery["budget_left_fraction"],
            ),
            ineligible=frozenset(delivery["ineligible"].tolist()),
            eligibility=Eligibility(ads, state, indexes, config.quota_seed),
        )


class GeneratorsStep(Step):
    """ANN retrieval per candidate generator: sequential, content, query (search), item
    (related) and popularity/pacing. Refuses an ad as the context item; flags a context item the
    model does not know (``unknown_context_item``)."""

    MODEL = "candgen_generators"
    INPUTS: ClassVar[Spec] = {
        "HISTORY_IDS": (I64, [-1], False),
        "AFFINITY": (F32, [-1], False),
        "USER_VECTOR": (F32, [-1], False),
        "K": (np.int32, [1], False),
        "QUERY_EMBEDDING": (F32, [-1], False),
        "CONTEXT_ITEM": (I64, [-1], False),
        "CONTEXT_VECTOR": (F32, [-1], False),
        "SCENARIO": (STR, [1], False),
        "AUDIENCE": (STR, [3], False),
        "BLOCKED_AD_IDS": (I64, [-1], False),
        "BLOCKED_ADVERTISER_IDS": (I64, [-1], False),
        "GENERATED_IDS": (I64, [-1], False),
        "GENERATED_SCORES": (F32, [-1], False),
        "ADMISSION": (I64, [2], True),
    }
    OUTPUTS: ClassVar[Spec] = {
        "CANDIDATE_IDS": (I64, [-1], False),
        "CANDIDATE_SCORES": (F32, [-1], False),
        "CANDIDATE_SOURCES": (np.int32, [-1], False),
        "CANDIDATE_FLAGS": (STR, [-1], False),
    }

    def __init__(self, folder: Path) -> None:
        import faiss

        super().__init__(folder)
        # One query per request: OpenMP threads only spin against the other steps' processes.
        faiss.omp_set_num_threads(1)
        self.generators = Generators.load(self.folder, self.index_config, self.config)
        self.watcher: DeliveryWatcher | None = None
        if self.config.enforce_constraints:
            # Every known segment's bitmaps, off the request path (about 9 ms each, 435 of them).
            threading.Thread(
                target=self.generators.eligibility.warm, name="eligibility-warm", daemon=True
            ).start()
        if self.config.delivery_poll_s > 0 and self.config.enforce_constraints:
            self.watcher = DeliveryWatcher(
                self.generators.eligibility,
                self.config.feature_client(),
                self.config.delivery_poll_s,
            )
            self.watcher.start()
        self.lock = threading.Lock()  # a request's searches against the catalogue updates
        ad_index = self.generators.ad_index
        self.updates = (
            watch_updates(self.config, ad_index, self.lock)
            if isinstance(ad_index, AdIndex)  # shards apply their own
            else None
        )

    def batch(self, requests: list[Tensors]) -> list[Tensors | Exception]:
        return each(requests, self._one)

    def _one(self, tensors: Tensors) -> Tensors:
        g = self.generators
        item = _optional_item(tensors)
        check_context_item(item, g.ad_index, g.content)
        item_vector = _optional_vector(tensors, "CONTEXT_VECTOR")
        context = context_from(tensors)
        scenario = _strings(tensors["SCENARIO"])[0]
        k = _k(tensors, self.config.max_k)
        enforce = self.config.enforce_constraints
        with self.lock:
            found = self._generate(tensors, context, item_vector, scenario, k, enforce)
        rows = [(ad, score, source) for source, cands in found.items() for ad, score in cands]
        unknown = item is not None and item_vector is None
        return {
            "CANDIDATE_IDS": np.asarray([r[0] for r in rows], dtype=np.int64),
            "CANDIDATE_SCORES": np.asarray([r[1] for r in rows], dtype=np.float32),
            "CANDIDATE_SOURCES": source_codes([r[2] for r in rows]),
            "CANDIDATE_FLAGS": _bytes([UNKNOWN_CONTEXT_ITEM] if unknown else []),
        }

    def _generate(
        self,
        tensors: Tensors,
        context: UserContext,
        item_vector: np.ndarray | None,
        scenario: str,
        k: int,
        enforce: bool,
    ) -> dict[str, list[tuple[int, float]]]:
        g = self.generators
        return generate(
            context,
            _optional_vector(tensors, "USER_VECTOR"),
            k,
            g.ad_index,
            g.content,
            g.popularity,
            g.ineligible,
            _optional_vector(tensors, "QUERY_EMBEDDING"),
            item_vector,
            request_eligibility(g.eligibility, context, scenario) if enforce else None,
            # twice the select step's limit: room for the near-duplicates it collapses
            2 * self.config.diversity(scenario).limit(k) if enforce else 0,
            written_of(tensors),
        )


class SelectStep(Step):
    """Quota allocation across the generators for the request's context (surface and user
    activity) by the quota policy, with dedup; reports each generator's count."""

    MODEL = "candgen_select"
    INPUTS: ClassVar[Spec] = {
        "CANDIDATE_IDS": (I64, [-1], False),
        "CANDIDATE_SCORES": (F32, [-1], False),
        "CANDIDATE_SOURCES": (np.int32, [-1], False),
        "SCENARIO": (STR, [1], False),
        "K": (np.int32, [1], False),
        "ACTIVITY": (I64, [1], False),
        "CONTEXT_FLAGS": (STR, [-1], False),
        "CANDIDATE_FLAGS": (STR, [-1], False),
        "ADMISSION": (I64, [2], True),
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
        self.catalog = AdCatalog.load(self.folder)
        self.diversity = {s: self.config.diversity(s) for s in SURFACES}

    def batch(self, requests: list[Tensors]) -> list[Tensors | Exception]:
        return each(requests, self._one)

    def _one(self, tensors: Tensors) -> Tensors:
        scenario = _strings(tensors["SCENARIO"])[0]
        self.quotas.for_surface(scenario)
        candidates: dict[str, list[tuple[int, float]]] = {}
        ids = np.asarray(tensors["CANDIDATE_IDS"]).tolist()
        scores = np.asarray(tensors["CANDIDATE_SCORES"]).tolist()
        sources = source_names(tensors["CANDIDATE_SOURCES"])
        for ad, score, source in zip(ids, scores, sources, strict=True):
            candidates.setdefault(source, []).append((ad, score))
        activity = int(np.asarray(tensors.get("ACTIVITY", [0])).reshape(-1)[0])
        k = _k(tensors, self.config.max_k)
        chosen = select(
            self.policy,
            candidates,
            scenario,
            activity,
            k,
            self.rng,
            self.catalog if self.config.enforce_constraints else None,
            self.diversity[scenario],
        )
        flags = _strings(tensors.get("CONTEXT_FLAGS")) + _strings(tensors.get("CANDIDATE_FLAGS"))
        return source_tensors(chosen, flags, self.policy.source(scenario))


STEPS: tuple[type[Step], ...] = (FeaturesStep, EncoderStep, GeneratorsStep, SelectStep)


def watch_updates(
    config: ServingConfig,
    index: AdIndex,
    lock: threading.Lock,
    keep: Callable[[np.ndarray], np.ndarray] | None = None,
) -> UpdateWatcher | None:
    """The running watcher of ``config.ad_updates_dir`` over ``index`` (None: no folder)."""
    if not config.ad_updates_dir:
        return None
    watcher = UpdateWatcher(
        Path(config.ad_updates_dir), index, lock, config.ad_updates_poll_s, keep
    )
    watcher.start()
    return watcher


class ShardStep(Step):
    """One shard of the ads index, on a server of its own (``candgen.serving.shards``): the
    top ``K`` of its ads for a user vector, less the request's exclusions. Not a step of the
    ensemble: the generators step asks every shard, merges their answers and keeps the
    request's eligibility (the delivery state it keeps current) on them."""

    MODEL = SHARD_MODEL
    # No batcher even as a backstop: its callers bound the queue (a generators instance asks
    # one request at a time), and Triton 2.51's batcher parked requests for 500 ms (508 ms at
    # most under the 10M-ad updates benchmark's load, docs/BENCHMARKS.md "Scale").
    BATCHER: ClassVar[bool] = False
    INPUTS: ClassVar[Spec] = {
        "USER_VECTOR": (F32, [-1], False),
        "K": (np.int32, [1], False),
        "EXCLUDE_IDS": (I64, [-1], True),
    }
    OUTPUTS: ClassVar[Spec] = {
        "AD_IDS": (I64, [-1], False),
        "AD_SCORES": (F32, [-1], False),
    }

    def __init__(self, folder: Path) -> None:
        import faiss

        super().__init__(folder)
        faiss.omp_set_num_threads(1)  # one query per request, as in the generators step
        self.index = AdIndex.load(self.folder / INDEX_FILE, self.index_config)
        self.index.positions()  # its layout, at load: the first filtered search would wait
        self.lock = threading.Lock()  # a search against the catalogue updates' steps
        shard, shards = self.provenance.get("shard", 0), self.provenance.get("shards", 1)
        self.updates = watch_updates(
            self.config, self.index, self.lock, lambda ids: shard_of(ids, shards) == shard
        )

    def batch(self, requests: list[Tensors]) -> list[Tensors | Exception]:
        return each(requests, self._one)

    def _one(self, tensors: Tensors) -> Tensors:
        vector = np.asarray(tensors["USER_VECTOR"], np.float32).reshape(-1)
        if vector.shape != (self.index.dim,):
            raise ConfigError(
                "USER_VECTOR", f"expected {self.index.dim} floats, got {vector.shape[0]}"
            )
        exclude = np.asarray(tensors.get("EXCLUDE_IDS", np.zeros(0, np.int64))).reshape(-1)
        k = _k(tensors, self.config.max_k)
        with self.lock:
            ids, scores = self.index.search(vector[None], k, exclude.tolist())
        return {"AD_IDS": ids[0].astype(np.int64), "AD_SCORES": scores[0].astype(np.float32)}


# Every python-backend model candgen serves: the ensemble's steps and the ads index's shards.
MODELS: tuple[type[Step], ...] = (*STEPS, ShardStep)
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
    g = Generators.load(folder[GeneratorsStep.MODEL], index_config, config)
    retriever = load_retriever(folder[EncoderStep.MODEL], config.encoder_device)
    query_encoder = load_query_encoder(folder[FeaturesStep.MODEL], config)
    generative = load_generative(folder[EncoderStep.MODEL], config)
    for reader in (retriever, *([generative.retriever] if generative else [])):
        check_query_width(
            getattr(reader, "query_text_dim", 0), query_encoder.dim, query_encoder.model
        )
    return RetrievalPipeline(
        retriever=retriever,
        ad_index=g.ad_index,
        content=g.content,
        popularity=g.popularity,
        features=features or config.feature_client(),
        quotas=config.policy(folder[SelectStep.MODEL]),
        max_k=config.max_k,
        ineligible=g.ineligible,
        seed=config.quota_seed,
        query_encoder=query_encoder,
        eligibility=g.eligibility if config.enforce_constraints else None,
        caps=config.caps,
        diversity={s: config.diversity(s) for s in SURFACES},
        catalog=AdCatalog.load(folder[SelectStep.MODEL]) if config.enforce_constraints else None,
        generative=generative,
    )
