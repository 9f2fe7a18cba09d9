"""rag.python_api's old name, rag.pipeline, still imports (with a warning)."""

from __future__ import annotations

import importlib
import sys

import pytest

from rag import python_api


def test_the_old_module_name_still_gives_the_api_and_says_where_it_went():
    sys.modules.pop("rag.pipeline", None)
    with pytest.warns(DeprecationWarning, match="rag.python_api"):
        old = importlib.import_module("rag.pipeline")
    assert old.RAG is python_api.RAG
