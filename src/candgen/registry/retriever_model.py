"""MLflow models-from-code entry: the registered pyfunc is built by running this file."""

import mlflow.models

from candgen.registry.pyfunc import RetrieverPyfunc

mlflow.models.set_model(RetrieverPyfunc())
