"""rag.services.search_sql: the document weight and the full-text half of hybrid search, on real Postgres."""

from __future__ import annotations

import random

import pytest
from django.db import connection

from rag.models import Chunk, Collection, Document, DocumentVector, TermFrequency
from rag.providers import QueryVector
from rag.services import documents, retrieval
from rag.services.documents import default_collection
from tests.factories import document_with_chunks

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


def titles(text: str, *, weight: float, settings, k: int = 3, matches: int = 40) -> list[str]:
    settings.RAG_HYBRID_WEIGHT = weight
    settings.RAG_FULLTEXT_CANDIDATES = matches
    settings.RAG_DOCUMENT_WEIGHT = 0.0
    query = QueryVector.from_floats(vector(random.Random(99)))
    return [s.title for s in retrieval.search(query, embedding_model=MODEL, k=k, text=text)]


def test_the_trigger_indexes_title_heading_and_text_with_weights(chunks):
    with connection.cursor() as cursor:
        cursor.execute("SELECT search_vector::text FROM rag_chunk WHERE id = %s", [chunks["Zephyr 9000 guide"].pk])
        [vector_text] = cursor.fetchone()
    assert "'zephyr':1A" in vector_text and "'9000':2A" in vector_text and "'filter':" in vector_text


def test_full_text_finds_what_the_vector_misses(chunks, settings):
    assert "Pump manual" not in titles("QX-4471 seal", weight=0.0, settings=settings)
    # The vector side scores it -1 and the filler about +1: a weight of 3 lets full text win.
    assert titles("QX-4471 seal", weight=3.0, settings=settings)[0] == "Pump manual"
    # A word of the title counts too.
    assert titles("zephyr 9000", weight=3.0, settings=settings)[0] == "Zephyr 9000 guide"
    # Without full-text candidates, full text only reorders the nearest chunks.
    settings.RAG_SEARCH_CANDIDATES = 10
    assert "Pump manual" not in titles("QX-4471 seal", weight=3.0, settings=settings, matches=0)


def test_without_a_full_text_match_hybrid_ranks_as_dense(chunks, settings):
    dense = titles("", weight=0.0, settings=settings, k=5)
    assert titles("nothing here matches", weight=0.5, settings=settings, k=5) == dense


def test_stop_words_alone_and_odd_input_do_not_break_the_statement(chunks, settings):
    for text in ("the and of", "", "'; DROP TABLE rag_chunk; --", '"unclosed', "-", "a | b & !c"):
        assert len(titles(text, weight=0.5, settings=settings, k=5)) == 5


@pytest.fixture
def pages() -> dict[str, Document]:
    """A one-chunk page about the question, and a long page about something else with one
    chunk a little closer to the question than the first page's."""
    query = vector(random.Random(99))
    elsewhere = vector(random.Random(5))
    on_topic = [x + 0.5 * y for x, y in zip(query, vector(random.Random(6)), strict=True)]
    close_by_chance = [x + 0.2 * y for x, y in zip(query, vector(random.Random(7)), strict=True)]
    made = {}
    for title, embeddings in [
        ("About the question", [on_topic]),
        (
            "About something else",
            [
                close_by_chance,
                *([x + 0.1 * y for x, y in zip(elsewhere, vector(random.Random(i)), strict=True)] for i in range(8)),
            ],
        ),
    ]:
        document = document_with_chunks(embeddings, model=MODEL, title=title)[0].document
        documents._store_document_vector(document, embedding_model=MODEL)
        made[title] = document
    return made


def nearest_title(settings, *, document_weight: float, collections=None) -> str:
    settings.RAG_DOCUMENT_WEIGHT = document_weight
    settings.RAG_HYBRID_WEIGHT = 0.0
    query = QueryVector.from_floats(vector(random.Random(99)))
    return retrieval.search(query, embedding_model=MODEL, k=1, collections=collections)[0].title


def test_the_document_weight_prefers_a_chunk_of_a_page_about_the_question(pages, settings):
    assert nearest_title(settings, document_weight=0.0) == "About something else"
    assert nearest_title(settings, document_weight=0.7) == "About the question"


def test_the_nearest_documents_propose_their_chunks_beyond_the_nearest_chunks(pages, settings):
    # One candidate from the chunks: the long page's chunk that resembles the question.
    settings.RAG_SEARCH_CANDIDATES = 1
    settings.RAG_DOCUMENT_CANDIDATES = 0
    assert nearest_title(settings, document_weight=2.5) == "About something else"
    # The page about the question is the nearest document: its chunk is proposed, and wins.
    settings.RAG_DOCUMENT_CANDIDATES = 1
    assert nearest_title(settings, document_weight=2.5) == "About the question"


def test_documents_out_of_scope_are_not_proposed(pages, settings):
    elsewhere = Collection.objects.create(name="elsewhere")
    Document.objects.filter(pk=pages["About the question"].pk).update(collection=elsewhere)
    Chunk.objects.filter(document=pages["About the question"]).update(collection=elsewhere)
    settings.RAG_SEARCH_CANDIDATES = 1
    settings.RAG_DOCUMENT_CANDIDATES = 1
    home = [default_collection().pk]
    # The nearest document is in another collection: the nearest one in scope is proposed.
    assert nearest_title(settings, document_weight=2.5, collections=home) == "About something else"
    assert nearest_title(settings, document_weight=2.5, collections=[elsewhere.pk]) == "About the question"


def test_a_document_without_its_vector_ranks_by_its_chunk(pages, settings):
    DocumentVector.objects.filter(document=pages["About the question"]).delete()
    # Its chunk stands for the document: the single chunk was its own mean anyway.
    assert nearest_title(settings, document_weight=0.7) == "About the question"
    DocumentVector.objects.all().delete()
    assert nearest_title(settings, document_weight=0.7) == "About something else"


def test_the_score_clients_see_stays_the_chunks_cosine(pages, settings):
    settings.RAG_HYBRID_WEIGHT = 0.0
    query = QueryVector.from_floats(vector(random.Random(99)))
    settings.RAG_DOCUMENT_WEIGHT = 0.0
    alone = {s.chunk_id: s.score for s in retrieval.search(query, embedding_model=MODEL, k=10)}
    settings.RAG_DOCUMENT_WEIGHT = 0.7
    weighted = {s.chunk_id: s.score for s in retrieval.search(query, embedding_model=MODEL, k=10)}
    assert weighted == pytest.approx(alone)


def test_only_rare_words_propose_full_text_candidates(chunks, settings):
    settings.RAG_SEARCH_CANDIDATES = 10  # the 20 filler chunks are nearer than the two far ones
    # Statistics as of a large table: "seal" rare (0.5% of chunks), "replace" common. A
    # question of common words alone proposes nothing beyond the nearest chunks, however
    # heavily full text counts.
    TermFrequency.objects.create(lexeme="seal", frequency=0.005)
    TermFrequency.objects.create(lexeme="replac", frequency=0.5)
    TermFrequency.objects.create(lexeme="", frequency=0.001)
    assert titles("seal", weight=3.0, settings=settings)[0] == "Pump manual"
    assert "Pump manual" not in titles("replace", weight=3.0, settings=settings)
