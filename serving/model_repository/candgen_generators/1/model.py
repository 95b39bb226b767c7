"""candgen's retrieve ensemble, step candgen_generators (a thin shell; see candgen.serving)."""

import triton_python_backend_utils as pb_utils

from candgen.serving.triton_model import triton_model

TritonPythonModel = triton_model("candgen_generators", pb_utils)
