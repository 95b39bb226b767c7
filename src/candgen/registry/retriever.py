"""Where registered versions of older candgen releases look for their pyfunc: the retriever now
lives in ``candgen.models.retriever`` and its MLflow wrapper in ``candgen.registry.pyfunc``."""

from candgen.models.retriever import DEFAULT_K, Retriever
from candgen.registry.pyfunc import RetrieverPyfunc

__all__ = ["DEFAULT_K", "Retriever", "RetrieverPyfunc"]
