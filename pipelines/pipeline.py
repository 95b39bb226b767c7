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

from candgen.training.config import JobConfig
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
WORK_DIR = JobConfig().work_dir


@dsl.pipeline(name=PIPELINE_NAME, description=__doc__.split("\n")[0])
def retrieval_pipeline(
    users: int = 1_000,
    ads: int = 1_500,
    days: int = 14,
    seed: int = 7,
    embed_text: bool = True,
    online: str = "sqlite",
    redis: str = "127.0.0.1:6379",
    feature_registry_dir: str = "",
    label: str = "click",
    model: str = "unified",
    epochs: int = 30,
    lr: float = 3e-3,
    max_len: int = 50,
    batch_size: int = 128,
    eval_days: int = 2,
    long_term_epochs: int = 20,
    scheduler: str = "local_cwd",
    replicas: int = 1,
    nproc: int = 2,
    cpus: int = 4,
    memory_mb: int = 16_384,
    gpus: int = 0,
    queue: str = "default",
    namespace: str = "candgen",
    work_volume: str = "candgen-work",
    model_name: str = "candgen-unified",
    tracking_uri: str = "",
    experiment: str = "candgen",
    kind: str = "auto",
    ef_search: int = 256,
    feature_server_url: str = "http://127.0.0.1:6566",
    max_k: int = 1_000,
    quota_policy: str = "learned",
    conversion_weight: float = 4.0,
    target_repository: str = "data/model_repository",
    triton_url: str = "",
) -> str:
    market = synth_data(users=users, ads=ads, days=days, seed=seed)
    tables = build_features(marketplace=market.outputs["marketplace"], embed_text=embed_text)
    job = {"scheduler": scheduler, "replicas": replicas, "nproc": nproc, "cpus": cpus,
           "memory_mb": memory_mb, "gpus": gpus, "queue": queue, "namespace": namespace,
           "work_volume": work_volume, "work_dir": WORK_DIR}  # fmt: skip
    summaries = long_term_features(marketplace=market.outputs["marketplace"],
                                   features=tables.outputs["features"], eval_days=eval_days,
                                   epochs=long_term_epochs, seed=seed, **job)  # fmt: skip
    feats = summaries.outputs["with_long_term"]
    store = feature_store(features=feats, online=online, redis=redis,
                          publish_dir=feature_registry_dir)  # fmt: skip
    training_set(marketplace=market.outputs["marketplace"], features=feats,
                 store=store.outputs["store"], label=label, online=online,
                 redis=redis)  # fmt: skip
    trained = train(marketplace=market.outputs["marketplace"], features=feats,
                    model=model, epochs=epochs, lr=lr, max_len=max_len, batch_size=batch_size,
                    eval_days=eval_days, seed=seed, tracking_uri=tracking_uri,
                    experiment=experiment, **job)  # fmt: skip
    for task in (summaries, store, trained):
        kubernetes.mount_pvc(task, pvc_name=work_volume, mount_path=WORK_DIR)
    evaluate(marketplace=market.outputs["marketplace"], features=feats,
             trained=trained.outputs["trained"])  # fmt: skip
    gate = register_gate(trained=trained.outputs["trained"], model_name=model_name,
                         tracking_uri=tracking_uri)  # fmt: skip
    decision = gate_open(promoted=gate.outputs["promoted"], message=gate.outputs["message"])
    with dsl.If(decision.output == True, name="gate-passed"):  # noqa: E712 - a KFP condition
        index = build_index(model_uri=gate.outputs["model_uri"], kind=kind, ef_search=ef_search,
                            tracking_uri=tracking_uri)  # fmt: skip
        learned = learn_quotas(trained=trained.outputs["trained"],
                               marketplace=market.outputs["marketplace"], features=feats,
                               index=index.outputs["index"], eval_days=eval_days,
                               conversion_weight=conversion_weight)  # fmt: skip
        repo = export_repository(model_uri=gate.outputs["model_uri"], features=feats,
                                 index=index.outputs["index"], quotas=learned.outputs["quotas"],
                                 feature_server_url=feature_server_url, max_k=max_k,
                                 quota_policy=quota_policy,
                                 tracking_uri=tracking_uri)  # fmt: skip
        deployed = deploy(
            repository=repo.outputs["repository"],
            target_repository=target_repository,
            triton_url=triton_url,
        )
        kubernetes.mount_pvc(deployed, pvc_name=work_volume, mount_path=WORK_DIR)
    return gate.outputs["message"]
