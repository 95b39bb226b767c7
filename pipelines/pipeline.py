"""`retrieval_pipeline`: data, features, the long-term summaries, Feast, training set, TorchX
training, evaluation, registry gate, then index, learned quotas, Triton repository and deploy,
which run only when the gate passes.

Parameters carry the names of the config dataclass fields they set (``users`` is
``SynthConfig.users``, ``epochs`` is ``TrainConfig.epochs``, ``ef_search`` is
``IndexConfig.ef_search``...); ``seed`` seeds both the data and the training.
Compile with ``candgen pipeline compile`` (writes pipelines/pipeline.yaml, checked in).

On a cluster the feature store, train and deploy steps mount the ReadWriteMany volume
``work_volume`` at ``JobConfig.work_dir``: the feature server reads the registry published to
``feature_registry_dir`` there, a kubernetes training job stages its data there, and Triton serves
``target_repository`` from it (k8s/ mounts the same claim). kfp.local ignores the mounts.
"""

from kfp import dsl, kubernetes

from candgen.data.synth import SynthConfig
from candgen.features.build import FeatureBuildConfig
from candgen.features.store import StoreConfig
from candgen.index.ann import IndexConfig
from candgen.quotas.learning import QuotaLearnConfig
from candgen.serving.steps import ServingConfig
from candgen.training.config import JobConfig, TrainConfig
from candgen.training.long_term import SummariserConfig
from components.build_features.component import build_features
from components.build_index.component import build_index
from components.deploy.component import deploy
from components.evaluate.component import evaluate
from components.export_repository.component import export_repository
from components.feature_store.component import feature_store
from components.learn_quotas.component import learn_quotas
from components.long_term_features.component import long_term_features
from components.register_gate.component import gate_open, register_gate
from components.synth_data.component import synth_data
from components.train.component import train
from components.training_set.component import training_set

PIPELINE_NAME = "candgen-retrieval"

# The pipeline's defaults, each declared once: the library's config dataclasses, with what the
# pipeline chooses differently said here (a demo-sized marketplace; the unified model at the
# settings chosen on that marketplace's validation window; the learned quotas asked for by name,
# so a missing table fails the export instead of falling back). Every parameter below and every
# component's default is checked against these (tests/unit/test_declarations.py).
SYNTH = SynthConfig(users=1_000, ads=1_500, seed=7)
FEATURES = FeatureBuildConfig()
STORE = StoreConfig()
TRAINING = TrainConfig(
    dataset="marketplace", model="unified", epochs=30, lr=3e-3, batch_size=128, eval_days=2
)
SUMMARISER = SummariserConfig(eval_days=TRAINING.eval_days)
JOB = JobConfig()
INDEX = IndexConfig()
QUOTAS = QuotaLearnConfig(eval_days=TRAINING.eval_days)
SERVING = ServingConfig(quota_policy="learned")
MODEL_NAME = "candgen-unified"
WORK_DIR = JOB.work_dir


@dsl.pipeline(name=PIPELINE_NAME, description=__doc__.split("\n")[0])
def retrieval_pipeline(
    users: int = SYNTH.users,
    ads: int = SYNTH.ads,
    days: int = SYNTH.days,
    seed: int = SYNTH.seed,
    embed_text: bool = FEATURES.embed_text,
    online: str = STORE.online,
    redis: str = STORE.redis,
    feature_registry_dir: str = "",
    label: str = "click",
    model: str = TRAINING.model,
    epochs: int = TRAINING.epochs,
    lr: float = TRAINING.lr,
    max_len: int = TRAINING.max_len,
    batch_size: int = TRAINING.batch_size,
    eval_days: int = TRAINING.eval_days,
    long_term_epochs: int = SUMMARISER.epochs,
    scheduler: str = JOB.scheduler,
    replicas: int = JOB.replicas,
    nproc: int = JOB.nproc,
    cpus: int = JOB.cpus,
    memory_mb: int = JOB.memory_mb,
    gpus: int = JOB.gpus,
    queue: str = JOB.queue,
    namespace: str = JOB.namespace,
    work_volume: str = JOB.work_volume,
    model_name: str = MODEL_NAME,
    tracking_uri: str = TRAINING.tracking_uri,
    experiment: str = TRAINING.experiment,
    kind: str = INDEX.kind,
    ef_search: int = INDEX.ef_search,
    feature_server_url: str = SERVING.feature_server_url,
    max_k: int = SERVING.max_k,
    quota_policy: str = SERVING.quota_policy,
    conversion_weight: float = QUOTAS.conversion_weight,
    target_repository: str = "data/model_repository",
    triton_url: str = "",
) -> str:
    market = synth_data(users=users, ads=ads, days=days, seed=seed)
    tables = build_features(marketplace=market.outputs["marketplace"], embed_text=embed_text)
    job = {
        "scheduler": scheduler,
        "replicas": replicas,
        "nproc": nproc,
        "cpus": cpus,
        "memory_mb": memory_mb,
        "gpus": gpus,
        "queue": queue,
        "namespace": namespace,
        "work_volume": work_volume,
        "work_dir": WORK_DIR,
    }
    summaries = long_term_features(
        marketplace=market.outputs["marketplace"],
        features=tables.outputs["features"],
        eval_days=eval_days,
        epochs=long_term_epochs,
        seed=seed,
        **job,
    )
    feats = summaries.outputs["with_long_term"]
    store = feature_store(
        features=feats, online=online, redis=redis, publish_dir=feature_registry_dir
    )
    training_set(
        marketplace=market.outputs["marketplace"],
        features=feats,
        store=store.outputs["store"],
        label=label,
        online=online,
        redis=redis,
    )
    trained = train(
        marketplace=market.outputs["marketplace"],
        features=feats,
        model=model,
        epochs=epochs,
        lr=lr,
        max_len=max_len,
        batch_size=batch_size,
        eval_days=eval_days,
        seed=seed,
        tracking_uri=tracking_uri,
        experiment=experiment,
        **job,
    )
    for task in (summaries, store, trained):
        kubernetes.mount_pvc(task, pvc_name=work_volume, mount_path=WORK_DIR)
    evaluate(
        marketplace=market.outputs["marketplace"],
        features=feats,
        trained=trained.outputs["trained"],
    )
    gate = register_gate(
        trained=trained.outputs["trained"], model_name=model_name, tracking_uri=tracking_uri
    )
    decision = gate_open(promoted=gate.outputs["promoted"], message=gate.outputs["message"])
    with dsl.If(decision.output == True, name="gate-passed"):  # noqa: E712 - a KFP condition
        index = build_index(
            model_uri=gate.outputs["model_uri"],
            kind=kind,
            ef_search=ef_search,
            tracking_uri=tracking_uri,
        )
        learned = learn_quotas(
            trained=trained.outputs["trained"],
            marketplace=market.outputs["marketplace"],
            features=feats,
            index=index.outputs["index"],
            eval_days=eval_days,
            conversion_weight=conversion_weight,
        )
        repo = export_repository(
            model_uri=gate.outputs["model_uri"],
            features=feats,
            index=index.outputs["index"],
            quotas=learned.outputs["quotas"],
            feature_server_url=feature_server_url,
            max_k=max_k,
            quota_policy=quota_policy,
            tracking_uri=tracking_uri,
        )
        deployed = deploy(
            repository=repo.outputs["repository"],
            target_repository=target_repository,
            triton_url=triton_url,
        )
        kubernetes.mount_pvc(deployed, pvc_name=work_volume, mount_path=WORK_DIR)
    return gate.outputs["message"]
