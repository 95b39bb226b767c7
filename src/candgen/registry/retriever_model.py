"""MLflow models-from-code entry: the registered pyfunc is built by running this file."""

import mlflow.models

from candgen.registry.retriever import RetrieverPyfunc

mlflow.models.set_model(RetrieverPyfunc())
