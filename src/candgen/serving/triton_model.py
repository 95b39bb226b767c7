"""The Triton python-backend shell shared by every step of the ``retrieve`` ensemble.

Each exported ``model.py`` is two lines: it names its step and calls ``triton_model``. The shell
maps Triton tensors onto ``Step.__call__`` and back, answers every request with exactly one
response, and reports failures in that response (a ``TritonError``) instead of raising, so a bad
request never takes the model down.
"""

from __future__ import annotations

import gc
import traceback
from pathlib import Path
from typing import Any

from candgen.errors import CandgenError, ConfigError
from candgen.serving.steps import STEPS, Step


def triton_model(step_model: str, pb_utils: Any) -> type:
    """The ``TritonPythonModel`` class for the step whose Triton model name is ``step_model``."""
    step_class = {s.MODEL: s for s in STEPS}[step_model]

    def error(message: str, code_name: str) -> Any:
        code = getattr(pb_utils.TritonError, code_name, None)
        err = (
            pb_utils.TritonError(message, code)
            if code is not None
            else pb_utils.TritonError(message)
        )
        return pb_utils.InferenceResponse(output_tensors=[], error=err)

    class TritonPythonModel:
        step: Step

        def initialize(self, args: dict[str, str]) -> None:
            folder = Path(args["model_repository"]) / args["model_version"]
            self.step = step_class(folder)
            # The loaded assets are millions of long-lived objects (id sets, ranked lists); frozen,
            # the collector's full passes no longer walk them on some request's path.
            gc.collect()
            gc.freeze()

        def execute(self, requests: list[Any]) -> list[Any]:
            responses = []
            for request in requests:
                try:
                    tensors = {}
                    for name in step_class.INPUTS:
                        t = pb_utils.get_input_tensor_by_name(request, name)
                        if t is not None:
                            tensors[name] = t.as_numpy()
                    out = self.step(tensors)
                    responses.append(
                        pb_utils.InferenceResponse(
                            output_tensors=[pb_utils.Tensor(n, v) for n, v in out.items()]
                        )
                    )
                except ConfigError as e:
                    responses.append(error(str(e), "INVALID_ARG"))
                except CandgenError as e:
                    responses.append(error(f"{step_model}: {e}", "INTERNAL"))
                except Exception as e:  # a bug must not take the server down
                    pb_utils.Logger.log_error(traceback.format_exc())
                    responses.append(error(f"{step_model}: internal error: {e!r}", "INTERNAL"))
            return responses

        def finalize(self) -> None:
            self.step = None  # type: ignore[assignment]

    return TritonPythonModel
