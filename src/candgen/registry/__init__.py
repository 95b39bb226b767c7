"""MLflow tracking, the model registry and promotion by alias."""
