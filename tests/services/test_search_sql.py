"""rag.services.search_sql: the full-text half of hybrid search, on real Postgres."""

from __future__ import annotations

import random

import pytest
from django.db import connection

from rag.models import Chunk, Document
from rag.providers import QueryVector
from rag.services import retrieval
from rag.services.documents import default_collection

pytestmark = pytest.mark.django_db

MODEL = "hybrid-test-16"
DIMENSIONS = 16


def vector(rng: random.Random) -> list[float]:
    return [rng.uniform(-1, 1) for _ in range(DIMENSIONS)]


@pytest.fixture
def chunks() -> dict[str, Chunk]:
    """Twenty chunks of filler around a query vector, and one far from it that names a part
    number; its document's title names a product."""
    rng = random.Random(3)
    collection = default_collection()
    query = vector(random.Random(99))
    made = {}
    for title, text, embedding in [
        *[
            (f"filler {i}", f"General notes number {i} about servicing.", [x + rng.gauss(0, 0.1) for x in query])
            for i in range(20)
        ],
        ("Pump manual", "Replace the seal with part QX-4471 every year.", [-x for x in query]),
        ("Zephyr 9000 guide", "Clean the filter monthly.", [-x + rng.gauss(0, 0.1) for x in query]),
    ]:
        document = Document.objects.create(collection=collection, title=title, content=text, content_hash=title)
        made[title] = Chunk.objects.create(
            document=document,
            collection=collection,
            position=0,
            text=text,
            token_count=8,
            embedding=embedding,
            embedding_model=MODEL,
        )
    return made


def titles(text: str, *, weight: float, settings, k: int = 3) -> list[str]:
    settings.RAG_HYBRID_WEIGHT = weight
    query = QueryVector.from_floats(vector(random.Random(99)))
    return [s.title for s in retrieval.search(query, embedding_model=MODEL, k=k, text=text)]


def test_the_trigger_indexes_title_heading_and_text_with_weights(chunks):
    with connection.cursor() as cursor:
        cursor.execute("SELECT search_vector::text FROM rag_chunk WHERE id = %s", [chunks["Zephyr 9000 guide"].pk])
        [vector_text] = cursor.fetchone()
    assert "'zephyr':1A" in vector_text and "'9000':2A" in vector_text and "'filter':" in vector_text


def test_full_text_finds_what_the_vector_misses(chunks, settings):
    assert "Pump manual" not in titles("QX-4471 seal", weight=0.0, settings=settings)
    assert titles("QX-4471 seal", weight=0.8, settings=settings)[0] == "Pump manual"
    # A word of the title counts too.
    assert titles("zephyr 9000", weight=0.8, settings=settings)[0] == "Zephyr 9000 guide"


def test_without_a_full_text_match_hybrid_ranks_as_dense(chunks, settings):
    dense = titles("", weight=0.0, settings=settings, k=5)
    assert titles("nothing here matches", weight=0.5, settings=settings, k=5) == dense


def test_stop_words_alone_and_odd_input_do_not_break_the_statement(chunks, settings):
    for text in ("the and of", "", "'; DROP TABLE rag_chunk; --", '"unclosed', "-", "a | b & !c"):
        assert len(titles(text, weight=0.5, settings=settings, k=5)) == 5
