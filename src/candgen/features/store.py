"""The Feast feature store around feature_repo/: apply, materialize, online lookups, pushes.

`feast apply` and `feast materialize-incremental` work in feature_repo/ as they are; these
functions wrap them so that the registry, the online store and the feature tables can live
outside the repo (a run's own folder, a test's temporary folder) without editing its files.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pandas as pd
import yaml

from candgen.errors import CandgenError, ConfigError
from candgen.features.build import FEATURE_TABLES
from candgen.paths import feature_repo_dir, replace_atomically
from candgen.vocab import SURFACES

if TYPE_CHECKING:  # Feast is imported where a store is opened, not with this module
    import subprocess

    from feast import FeatureStore
    from feast.repo_config import RepoConfig

ONLINE_STORES: Final = {"sqlite": "feature_store.yaml", "redis": "feature_store.redis.yaml"}
REPO_MODULES: Final = ("entities", "data_sources", "features", "feature_services")
SHORT_TERM_VIEW: Final = "user_short_term"
SHORT_TERM_PUSH: Final = "user_short_term_push"
SHORT_TERM_FIELDS: Final = (
    "recent_item_ids",
    "recent_action_types",
    "recent_surfaces",
    "recent_timestamps",
)
ACTION_TYPES: Final = ("view", "like", "save", "click", "conversion")


@dataclass(frozen=True)
class StoreConfig:
    """Where the feature store keeps its parts. CLI flags map 1:1 onto these fields.

    Args:
        online: the online store, ``sqlite`` (default) or ``redis``.
        features_dir: the offline feature tables (default: feature_repo/data/features).
        state_dir: the registry and the SQLite online store (default: feature_repo/data).
        redis: Redis connection string, with ``online=redis``.
        project: Feast project name; Redis keys are namespaced by it.
        repo_dir: the feature repository with the definitions.
    """

    online: str = "sqlite"
    features_dir: Path | None = None
    state_dir: Path | None = None
    redis: str = "127.0.0.1:6379"
    project: str = "candgen"
    repo_dir: Path = field(default_factory=feature_repo_dir)

    def __post_init__(self) -> None:
        if self.online not in ONLINE_STORES:
            raise ConfigError(
                "online", f"must be one of {sorted(ONLINE_STORES)}, got {self.online!r}"
            )
        if not self.project.replace("_", "").isalnum() or self.project[0] == "_":
            raise ConfigError(
                "project", f"letters, digits and underscores only, got {self.project!r}"
            )
        if not (self.repo_dir / ONLINE_STORES[self.online]).exists():
            raise ConfigError("repo_dir", f"{self.repo_dir} has no {ONLINE_STORES[self.online]}")

    @property
    def features_path(self) -> Path:
        return (self.features_dir or self.repo_dir / "data" / "features").resolve()

    @property
    def state_path(self) -> Path:
        return (self.state_dir or self.repo_dir / "data").resolve()


def repo_config(cfg: StoreConfig) -> RepoConfig:
    """Reads the checked-in feature_store(.redis).yaml and points its paths at ``cfg``."""
    from feast.repo_config import RepoConfig

    raw = yaml.safe_load(os.path.expandvars((cfg.repo_dir / ONLINE_STORES[cfg.online]).read_text()))
    raw["project"] = cfg.project
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    raw["registry"] = str(cfg.state_path / "registry.db")
    if cfg.online == "sqlite":
        raw["online_store"]["path"] = str(cfg.state_path / "online_store.db")
    else:
        raw["online_store"]["connection_string"] = cfg.redis
    config = RepoConfig(**raw)
    config.repo_path = cfg.repo_dir
    return config


def open_store(cfg: StoreConfig = StoreConfig()) -> FeatureStore:
    """A FeatureStore on ``cfg``'s registry and online store."""
    from feast import FeatureStore

    return FeatureStore(config=repo_config(cfg))


@contextlib.contextmanager
def _repo_modules(cfg: StoreConfig) -> Iterator[list[Any]]:
    # The definitions read $CANDGEN_FEATURES_DIR when imported, so import them afresh each time
    # and leave neither the variable nor the modules behind.
    saved_env = os.environ.get("CANDGEN_FEATURES_DIR")
    saved_path = list(sys.path)
    os.environ["CANDGEN_FEATURES_DIR"] = str(cfg.features_path)
    sys.path.insert(0, str(cfg.repo_dir))
    for name in REPO_MODULES:
        sys.modules.pop(name, None)
    try:
        yield [importlib.import_module(name) for name in REPO_MODULES]
    finally:
        for name in REPO_MODULES:
            sys.modules.pop(name, None)
        sys.path[:] = saved_path
        if saved_env is None:
            os.environ.pop("CANDGEN_FEATURES_DIR", None)
        else:
            os.environ["CANDGEN_FEATURES_DIR"] = saved_env


def load_definitions(cfg: StoreConfig) -> list[Any]:
    """Every Feast object defined in the feature repository, data sources first."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    objects: dict[tuple[str, str], Any] = {}
    with _repo_modules(cfg) as modules:
        for module in modules:
            for value in vars(module).values():
                for kind in (DataSource, Entity, FeatureView, FeatureService):
                    if isinstance(value, kind):
                        objects.setdefault((kind.__name__, value.name), value)
    return list(objects.values())


def service_feature_refs(service: str, cfg: StoreConfig | None = None) -> list[str]:
    """The ``view:feature`` references a feature service stands for, from the repository's
    definitions (the serving runtime, which cannot import Feast, asks for these by name)."""
    from feast import FeatureService

    services = {
        o.name: o for o in load_definitions(cfg or StoreConfig()) if isinstance(o, FeatureService)
    }
    if service not in services:
        raise ConfigError(
            "feature_service",
            f"unknown feature service {service!r}; the repository defines {sorted(services)}",
        )
    # Feast's FeatureViewProjection.name_to_use has no annotations.
    return [
        f"{proj.name_to_use()}:{feat.name}"  # type: ignore[no-untyped-call]
        for proj in services[service].feature_view_projections
        for feat in proj.features
    ]


def check_feature_tables(cfg: StoreConfig) -> dict[str, Any]:
    """Checks that every feature table exists; returns the tables' manifest."""
    missing = [t for t in FEATURE_TABLES if not (cfg.features_path / f"{t}.parquet").exists()]
    manifest = cfg.features_path / "manifest.json"
    if missing or not manifest.exists():
        raise CandgenError(
            f"features_dir: {cfg.features_path} lacks {missing or ['manifest.json']}; "
            "run `candgen features build` first"
        )
    tables: dict[str, Any] = json.loads(manifest.read_text())
    return tables


@dataclass
class ApplySummary:
    entities: list[str]
    feature_views: list[str]
    feature_services: list[str]
    data_sources: list[str]


def apply(cfg: StoreConfig = StoreConfig()) -> ApplySummary:
    """Registers the repository's definitions (what `feast apply` does) and creates the tables
    of the online store."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    check_feature_tables(cfg)
    objects = load_definitions(cfg)
    store = open_store(cfg)
    store.apply(objects)

    def names(kind: type[Any]) -> list[str]:
        return sorted(o.name for o in objects if isinstance(o, kind))

    return ApplySummary(
        entities=names(Entity),
        feature_views=names(FeatureView),
        feature_services=names(FeatureService),
        data_sources=names(DataSource),
    )


def materialize(cfg: StoreConfig = StoreConfig(), end: datetime | None = None) -> datetime:
    """Loads the newest feature values up to ``end`` into the online store, incrementally
    (what `feast materialize-incremental` does).

    Args:
        cfg: the store.
        end: the end of the window; default: the end of the data's clock (its manifest).

    Returns:
        The end used.
    """
    manifest = check_feature_tables(cfg)
    if end is None:
        end = datetime.fromisoformat(manifest["data_end"])
    if end.tzinfo is None:
        end = end.replace(tzinfo=UTC)
    store = open_store(cfg)
    views = store.list_feature_views()
    if not views:
        raise CandgenError("the registry has no feature views; run `candgen features apply` first")
    # Feast starts a view's first incremental window at now - ttl, which misses data whose clock
    # is not the wall clock (a replayed or synthetic log). A view's first load therefore starts
    # at the data's beginning; later loads continue from where the last one ended.
    first = [v.name for v in views if not v.materialization_intervals]
    if first:
        start = datetime.fromisoformat(manifest["data_start"])
        store.materialize(start_date=start, end_date=end, feature_views=first)
    rest = [v.name for v in views if v.materialization_intervals]
    if rest:
        store.materialize_incremental(end_date=end, feature_views=rest)
    return end


def publish(cfg: StoreConfig, target: Path) -> list[Path]:
    """Copies the registry (and a SQLite online store) into ``target``, where a feature server
    reads them (``--state-dir``); each file is replaced atomically, so a running server never
    sees half a file.

    Returns:
        The files written.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    names = ["registry.db"] + (["online_store.db"] if cfg.online == "sqlite" else [])
    written = []
    for name in names:
        source = cfg.state_path / name
        if not source.exists():
            raise CandgenError(f"state_dir: {source} does not exist; apply and materialize first")
        replace_atomically(target / name, functools.partial(shutil.copyfile, source))
        written.append(target / name)
    return written


def online_features(
    store: FeatureStore, entity_rows: Sequence[dict[str, int]], service: str = "user_features_v1"
) -> dict[str, list[Any]]:
    """Looks up a feature service online, e.g. ``[{"user_id": 7}]`` for user_features_v1.

    An unknown entity comes back with None values, never an error.
    """
    found: dict[str, list[Any]] = store.get_online_features(
        features=store.get_feature_service(service),
        entity_rows=[{k: int(v) for k, v in row.items()} for row in entity_rows],
    ).to_dict()
    return found


@dataclass(frozen=True)
class Engagement:
    """One real-time engagement to append to a user's short-term sequence.

    Args:
        user_id: the user.
        item_id: the engaged item or ad id.
        action_type: one of ``ACTION_TYPES``.
        surface: one of home, search, related.
        timestamp: when it happened (UTC).
    """

    user_id: int
    item_id: int
    action_type: str
    surface: str
    timestamp: datetime

    def __post_init__(self) -> None:
        for name in ("user_id", "item_id"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(name, f"must be a positive integer id, got {v!r}")
        if self.action_type not in ACTION_TYPES:
            raise ConfigError(
                "action_type", f"must be one of {ACTION_TYPES}, got {self.action_type!r}"
            )
        if self.surface not in SURFACES:
            raise ConfigError("surface", f"must be one of {SURFACES}, got {self.surface!r}")
        if not isinstance(self.timestamp, datetime) or self.timestamp.tzinfo is None:
            raise ConfigError("timestamp", "must be a timezone-aware datetime")


def push_engagements(
    store: FeatureStore, engagements: Sequence[Engagement], max_len: int = 20
) -> None:
    """Appends engagements to the users' short-term sequences in the online store.

    Reads each user's current sequence online, appends the new engagements in time order,
    keeps the newest ``max_len`` and pushes the result through the push source. All inputs are
    validated before anything is written.
    """
    if not engagements:
        return
    by_user: dict[int, list[Engagement]] = {}
    for e in sorted(engagements, key=lambda e: e.timestamp):
        by_user.setdefault(e.user_id, []).append(e)
    current = store.get_online_features(
        features=[f"{SHORT_TERM_VIEW}:{f}" for f in SHORT_TERM_FIELDS],
        entity_rows=[{"user_id": u} for u in by_user],
    ).to_dict()
    rows = []
    for i, (user, events) in enumerate(by_user.items()):
        seq = {f: list(current[f][i] or []) for f in SHORT_TERM_FIELDS}
        for e in events:
            seq["recent_item_ids"].append(e.item_id)
            seq["recent_action_types"].append(e.action_type)
            seq["recent_surfaces"].append(e.surface)
            seq["recent_timestamps"].append(int(e.timestamp.timestamp()))
        rows.append(
            {
                "user_id": user,
                "event_timestamp": events[-1].timestamp,
                **{f: v[-max_len:] for f, v in seq.items()},
            }
        )
    from feast.data_source import PushMode

    store.push(SHORT_TERM_PUSH, pd.DataFrame(rows), to=PushMode.ONLINE)


def serve(cfg: StoreConfig, host: str = "127.0.0.1", port: int = 6566, workers: int = 1) -> None:
    """Runs the Feast feature server (HTTP) on ``cfg``'s registry and online store; blocks.

    The Triton runtime reads online features through it, since that environment (numpy<2)
    cannot import Feast.
    """
    if not 0 < port < 65536:
        raise ConfigError("port", f"must be a TCP port (1..65535), got {port}")
    # Feast's default recycles each gunicorn worker after ~1,000 requests; a worker restart
    # stalls lookups for about a second, which the serving path sees as an unreachable store
    # (every ~4 s at 250 requests/s: benchmarks/serving.py measured p99 over 1 s).
    open_store(cfg).serve(host, port, workers=workers, no_access_log=True, max_requests=0)


class FeatureServerProcess:
    """``candgen features serve`` as a child process, for the demo, tests and benchmarks.

    Args:
        cfg: the store to serve (applied and materialized).
        port: the HTTP port.
        log: where the server's output goes (default: discarded).
        lean: run the lean online-read front (``candgen.features.online_reads``) instead of
            Feast's feature server.
    """

    def __init__(
        self, cfg: StoreConfig, port: int = 6566, log: Path | None = None, lean: bool = False
    ) -> None:
        self.cfg, self.port, self.log, self.lean = cfg, port, log, lean
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> str:
        """Starts the server and waits until it answers a lookup; returns its URL.

        The first lookup loads the registry and opens the online store, which takes seconds;
        it is made here, so the first request that serving times is not a fallback.
        """
        import subprocess
        import time
        import urllib.request

        from candgen.features.client import FeatureServerClient
        from candgen.vocab import USER_SERVING_SERVICE

        c = self.cfg
        cmd = [
            sys.executable,
            "-m",
            "candgen.cli",
            "features",
            "serve",
            "--port",
            str(self.port),
            "--features-dir",
            str(c.features_path),
            "--state-dir",
            str(c.state_path),
            "--online",
            c.online,
            "--redis",
            c.redis,
            "--project",
            c.project,
            "--repo-dir",
            str(c.repo_dir),
            *(["--lean"] if self.lean else []),
        ]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CandgenError(
                    f"feature server exited with {self.proc.returncode}"
                    + (f"; see {self.log}" if self.log else "")
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        left = max(deadline - time.monotonic(), 1.0)
                        FeatureServerClient(self.url, left).lookup(
                            USER_SERVING_SERVICE, "user_id", 0
                        )
                        return self.url
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise CandgenError(f"feature server on port {self.port} not ready after {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 20.0) -> None:
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> FeatureServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
