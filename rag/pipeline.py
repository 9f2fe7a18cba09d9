"""The Python API's old home: ``from rag.pipeline import RAG`` still works, with a warning.

The module is ``rag.python_api`` now: it is the Python wrapper around the services, not
the pipeline (that is rag.services.answering).
"""

import warnings

from rag.python_api import RAG, Answer  # noqa: F401

warnings.warn("rag.pipeline is now rag.python_api: import RAG from there.", DeprecationWarning, stacklevel=2)
