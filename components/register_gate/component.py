"""Register the trained model as the challenger and promote it only if the gate passes."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Input, Model

from candgen.images import PLATFORM_IMAGE


@dsl.component(base_image=PLATFORM_IMAGE)
def register_gate(
    trained: Input[Model],
    model_name: str = "candgen-unified",
    tracking_uri: str = "",
) -> NamedTuple("GateOutputs", [("promoted", bool), ("model_uri", str), ("message", str)]):
    """Registers the training run's model as a new version (alias ``challenger``) and moves
    ``champion`` to it when its primary metric is at least the champion's.

    Returns:
        promoted: whether the new version is the champion now (deploy only then).
        model_uri: ``models:/<model_name>/<version>``, the version just registered (pinned, so
            later steps use it even if the alias moves meanwhile).
        message: what the gate decided, in words.
    """
    from typing import NamedTuple

    from candgen.registry.tracking import PromotionRefused, promote, register

    class GateOutputs(NamedTuple):
        promoted: bool
        model_uri: str
        message: str

    run_id = trained.metadata["run_id"]
    registered = register(run_id, model_name, trained.metadata["primary_metric"], tracking_uri)
    uri = f"models:/{model_name}/{registered['version']}"
    try:
        out = promote(model_name, tracking_uri)
    except PromotionRefused as refused:
        message = f"gate refused v{registered['version']}: {refused}; nothing is deployed"
        print(message, flush=True)
        return GateOutputs(False, uri, message)
    message = (
        f"gate passed: {model_name} v{out['champion']} is the champion "
        f"({out['metric']} = {float(out['challenger_value']):.4f})"
    )
    print(message, flush=True)
    return GateOutputs(True, uri, message)


@dsl.component(base_image=PLATFORM_IMAGE)
def gate_open(promoted: bool, message: str) -> bool:
    """Says the gate's decision as a step of its own and hands it on as the task's single output.

    The deploying steps are conditioned on this output rather than on ``register_gate``'s
    ``promoted``: kfp.local (kfp 2.17) resolves a condition only on a task's ``Output``, not on
    a named output, and would skip the deploying steps of every run.
    """
    print(("deploying: " if promoted else "not deploying: ") + message, flush=True)
    return promoted
