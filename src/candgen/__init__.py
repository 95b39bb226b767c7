"""candgen: ads candidate generation for Kubeflow."""

__version__ = "0.1.0"
