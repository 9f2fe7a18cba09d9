"""rag.services.term_stats: word rarity from Postgres's statistics, and the BM25 it feeds."""

from __future__ import annotations

import math

import pytest
from django.db import DatabaseError, connection

from rag.models import Chunk, TermFrequency
from rag.providers import QueryVector
from rag.services import retrieval, search_sql, term_stats
from tests.factories import document_with_chunks

pytestmark = pytest.mark.django_db

MODEL = "term-stats-4"
SAME = [1.0, 0.0, 0.0, 0.0]  # every chunk as near the question as the others: full text decides


def store(texts: list[str]) -> list[Chunk]:
    """A document per text, all as near the question: only full text tells them apart."""
    return [
        document_with_chunks([SAME], model=MODEL, title=f"doc {n}", texts=[text])[0] for n, text in enumerate(texts)
    ]


def test_refresh_copies_how_common_each_word_is():
    store([f"The kettle boils water, note {n}." for n in range(30)] + ["A lone teapot."])
    assert term_stats.refresh() > 0
    frequency = dict(TermFrequency.objects.values_list("lexeme", "frequency"))
    # In every stored chunk, as far as this test knows (other tests' rows are rolled back).
    assert frequency["kettl"] == pytest.approx(30 / 31, abs=0.05)
    assert frequency["kettl"] > frequency.get("teapot", frequency[""])
    assert 0 < frequency[""] <= min(f for lexeme, f in frequency.items() if lexeme) / 2 + 1e-9


def test_a_rare_word_outweighs_a_common_one(settings):
    settings.RAG_DOCUMENT_WEIGHT = 0.0
    settings.RAG_HYBRID_WEIGHT = 0.1
    common = [f"Boiling water in a kettle, note {n}." for n in range(20)]
    chunks = store([*common, "Water for the samovar.", "Kettle kettle kettle."])
    term_stats.refresh()
    found = retrieval.search(
        QueryVector.from_floats(SAME), embedding_model=MODEL, k=3, text="samovar kettle", collections=None
    )
    # "kettle" is in 21 of 22 chunks, "samovar" in one: the samovar's chunk comes first,
    # although the last chunk says "kettle" three times.
    assert found[0].chunk_id == chunks[-2].pk
    assert found[1].chunk_id == chunks[-1].pk


def test_words_without_statistics_still_count(settings):
    settings.RAG_DOCUMENT_WEIGHT = 0.0
    settings.RAG_HYBRID_WEIGHT = 0.1
    chunks = store(["Tea leaves.", "Coffee beans.", "Cocoa powder."])
    TermFrequency.objects.all().delete()  # before any statistics: every word counts alike
    found = retrieval.search(QueryVector.from_floats(SAME), embedding_model=MODEL, k=1, text="coffee")
    assert found[0].chunk_id == chunks[1].pk


def analyzes(action) -> int:
    statements: list[str] = []
    with connection.execute_wrapper(lambda execute, sql, *rest: statements.append(sql) or execute(sql, *rest)):
        action()
    return sum(sql.startswith("ANALYZE") for sql in statements)


def test_statistics_follow_the_table_as_it_grows(settings):
    settings.RAG_TERM_STATS_REFRESH_S = 3600
    store([f"Chunk {n} about kettles." for n in range(100)])
    term_stats.refresh()  # 100 chunks
    # A quarter more than the table held is needed; what this process stored is counted.
    assert analyzes(lambda: term_stats.refresh_if_stale(stored=20)) == 0
    assert analyzes(lambda: term_stats.refresh_if_stale(stored=10)) == 1
    assert analyzes(lambda: term_stats.refresh_if_stale(stored=10)) == 0


def test_statistics_are_refreshed_when_they_are_old(settings):
    settings.RAG_TERM_STATS_REFRESH_S = 3600
    store([f"Chunk {n} about kettles." for n in range(100)])
    term_stats.refresh()
    assert analyzes(lambda: term_stats.refresh_if_stale(stored=1)) == 0
    settings.RAG_TERM_STATS_REFRESH_S = 0
    assert analyzes(lambda: term_stats.refresh_if_stale(stored=1)) == 1


def test_the_idf_is_minus_the_log_of_the_frequency():
    # What the statement computes for a lexeme held by a quarter of the chunks.
    TermFrequency.objects.all().delete()
    TermFrequency.objects.create(lexeme="kettl", frequency=0.25)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT t.idfs[1] FROM (SELECT 'kettle'::text AS text) AS q CROSS JOIN LATERAL ("
            + search_sql._QUERY_TERMS
            + ") AS t(lexemes, idfs)",
            ["english"],
        )
        assert cursor.fetchone()[0] == pytest.approx(-math.log(0.25))


def test_a_failed_refresh_is_logged_and_storing_goes_on(caplog):
    def refuse_analyze(execute, sql, params, many, context):
        if sql.startswith("ANALYZE"):
            raise DatabaseError("must be owner of table rag_chunk")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(refuse_analyze):
        term_stats.refresh_or_warn()
    assert "must be owner of table rag_chunk" in caplog.text
    # The connection is usable afterwards (the failure was rolled back to its savepoint).
    assert store(["Still works."])
