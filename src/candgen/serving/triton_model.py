"""The Triton python-backend shell shared by every step of the ``retrieve`` ensemble.

Each exported ``model.py`` is two lines: it names its step and calls ``triton_model``. The shell
maps the requests Triton's dynamic batcher hands one ``execute`` onto ``Step.batch`` and back,
answers every request with exactly one response, and reports failures in that response (a
``TritonError``) instead of raising, so a bad request never takes the model down nor fails the
requests batched with it.

With ``CANDGEN_PROFILE_DIR`` set in the server's environment, each step instance profiles its
executes (cProfile, the execute thread only) into ``<dir>/<model>.<pid>.prof`` every 200
executes and at unload: the live profile that ``docs/benchmarks/serving_notes.md`` reads.

Every tensor carries Triton's batch dimension first (``max_batch_size`` > 0); one request is one
user, so the shell takes row 0 of each input and gives each output a batch dimension of 1.
"""

from __future__ import annotations

import cProfile
import gc
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from candgen.errors import CandgenError, ConfigError
from candgen.serving.admission import InflightLimit, Overloaded, admission_of, slots_file
from candgen.serving.steps import MODELS, STEPS, Step, Tensors

PROFILE_ENV = "CANDGEN_PROFILE_DIR"
PROFILE_EVERY = 200  # executes between two dumps of a live profile


class ExecuteProfile:
    """cProfile of a step's executes when ``CANDGEN_PROFILE_DIR`` is set (else a no-op)."""

    def __init__(self, model: str) -> None:
        folder = os.environ.get(PROFILE_ENV, "")
        self.path = Path(folder) / f"{model}.{os.getpid()}.prof" if folder else None
        self.profile = cProfile.Profile() if folder else None
        self.calls = 0

    def run(
        self, fn: Callable[[list[Tensors]], list[Tensors | Exception]], batch: list[Tensors]
    ) -> list[Tensors | Exception]:
        if self.profile is None:
            return fn(batch)
        self.profile.enable()
        try:
            return fn(batch)
        finally:
            self.profile.disable()
            self.calls += 1
            if self.calls % PROFILE_EVERY == 0:
                self.dump()

    def dump(self) -> None:
        if self.profile is not None and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.profile.dump_stats(str(self.path))


def triton_model(step_model: str, pb_utils: Any) -> type:
    """The ``TritonPythonModel`` class for the step whose Triton model name is ``step_model``."""
    step_class = {s.MODEL: s for s in MODELS}[step_model]

    def error(message: str, code_name: str) -> Any:
        code = getattr(pb_utils.TritonError, code_name, None)
        err = (
            pb_utils.TritonError(message, code)
            if code is not None
            else pb_utils.TritonError(message)
        )
        return pb_utils.InferenceResponse(output_tensors=[], error=err)

    def request_tensors(request: Any) -> Tensors:
        tensors = {}
        for name in step_class.INPUTS:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is not None:
                tensors[name] = unbatch(name, t.as_numpy())
        return tensors

    def respond(answer: Tensors | Exception | None) -> Any:
        answer = answer if answer is not None else CandgenError("no answer")
        if isinstance(answer, ConfigError):
            return error(str(answer), "INVALID_ARG")
        if isinstance(answer, Overloaded):
            return error(f"{step_model}: {answer}", "UNAVAILABLE")
        if isinstance(answer, CandgenError):
            return error(f"{step_model}: {answer}", "INTERNAL")
        if isinstance(answer, Exception):
            pb_utils.Logger.log_error("".join(traceback.format_exception(answer)))
            return error(f"{step_model}: internal error: {answer!r}", "INTERNAL")
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(n, v[None]) for n, v in answer.items()]
        )

    class TritonPythonModel:
        step: Step
        profile: ExecuteProfile = ExecuteProfile("")  # replaced in initialize

        def initialize(self, args: dict[str, str]) -> None:
            folder = Path(args["model_repository"]) / args["model_version"]
            self.step = step_class(folder)
            self.profile = ExecuteProfile(step_model)
            limit = self.step.config.max_inflight
            if limit:
                self.step.admission = InflightLimit(slots_file(args["model_version"], limit), limit)
            # The loaded assets are millions of long-lived objects (id sets, ranked lists); frozen,
            # the collector's full passes no longer walk them on some request's path.
            gc.collect()
            gc.freeze()

        def execute(self, requests: list[Any]) -> list[Any]:
            answers: list[Tensors | Exception | None] = [None] * len(requests)
            rows, batch = [], []
            for row, request in enumerate(requests):
                try:
                    batch.append(request_tensors(request))
                    rows.append(row)
                except Exception as e:  # a malformed request: its own answer
                    answers[row] = e
            try:
                results = self.profile.run(self.step.batch, batch) if batch else []
            except Exception as e:  # a bug must not take the server down
                results = [e] * len(batch)
            if len(results) != len(batch):  # a bug too: every request still gets an answer
                results = [CandgenError(f"{len(results)} answers for {len(batch)}")] * len(batch)
            for row, result in zip(rows, results, strict=True):
                answers[row] = result
            leave(self.step, batch, results, last=step_class is STEPS[-1])
            responses = []
            for answer in answers:
                try:
                    responses.append(respond(answer))
                except Exception as e:  # an output Triton's tensor refused: still one answer
                    responses.append(respond(e))
            return responses

        def finalize(self) -> None:
            self.profile.dump()
            self.step = None  # type: ignore[assignment]

    return TritonPythonModel


def leave(step: Step, batch: list[Tensors], results: list[Tensors | Exception], last: bool) -> None:
    """Lets requests out of the server's in-flight set: after the last step every request of
    the batch, before it those answered with an error (they go no further)."""
    if step.admission is None:
        return
    gone = [
        admission_of(tensors.get("ADMISSION"))
        for tensors, result in zip(batch, results, strict=True)
        if last or isinstance(result, Exception)
    ]
    step.admission.release([a for a in gone if a is not None])


def unbatch(name: str, value: Any) -> Any:
    """One request's tensor without Triton's batch dimension.

    Raises:
        ConfigError: naming the tensor, when the request carries more than one user.
    """
    if value.ndim == 0 or value.shape[0] != 1:
        raise ConfigError(
            name,
            f"one request carries one user (batch dimension 1), got shape {list(value.shape)}; "
            "send concurrent requests instead (the server batches them)",
        )
    return value[0]
