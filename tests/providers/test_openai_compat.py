from __future__ import annotations

import json

import pytest

from rag.providers import QueryVector, embedding_provider


async def test_query_vector_keeps_the_servers_numbers_as_text(fake_llm):
    embedder = embedding_provider()
    [floats] = await embedder.embed(["vector search"])
    query = await embedder.embed_query("vector search")
    assert query.dimensions == len(floats) == 64
    assert query.literal.startswith("[") and query.literal.endswith("]")
    assert json.loads(query.literal) == pytest.approx(floats)


def test_query_vector_from_floats_is_a_pgvector_literal():
    query = QueryVector.from_floats([0.5, -1.0, 1e-05])
    assert query == QueryVector(literal="[0.5,-1.0,1e-05]", dimensions=3)
