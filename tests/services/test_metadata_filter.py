"""rag.services.metadata_filter: filters written as JSON, applied in the search's SQL."""

from __future__ import annotations

import random
import re

import pytest
from django.db import connection

from rag.models import Chunk, Document
from rag.providers import QueryVector
from rag.services import retrieval
from rag.services.documents import default_collection
from rag.services.metadata_filter import FilterError, MetadataFilter
from rag.services.vector_index import ensure_vector_index
from tests.test_db import brute_force, unit_vectors

# --- the filter language -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "jsonpath"),
    [
        ({"tags": "faq"}, '$."tags" == "faq"'),
        ({"draft": {"eq": False}}, '$."draft" == false'),
        ({"tags": {"in": ["a", "b"]}}, '($."tags" == "a" || $."tags" == "b")'),
        ({"year": {"gte": 2020, "lt": 2025}}, '$."year" >= 2020 && $."year" < 2025'),
        ({"a.b": 1, "c": None}, '$."a.b" == 1 && $."c" == null'),
        ('{"title": "say \\"hi\\"\\n"}', '$."title" == "say \\"hi\\"\\n"'),
    ],
)
def test_filters_become_path_predicates(spec, jsonpath):
    assert MetadataFilter.parse(spec).jsonpath == jsonpath


@pytest.mark.parametrize("spec", [None, {}, "", "  "])
def test_an_empty_filter_filters_nothing(spec):
    assert MetadataFilter.parse(spec) is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "must be a JSON object"),
        ({"year": {"between": [1, 2]}}, "Unknown operator 'between' on 'year': use one of eq, gt, gte, lt, lte, in"),
        ({"year": {"gte": True}}, "'gte' on 'year' compares with a number or a date"),
        ({"year": {"gte": [2020]}}, "'gte' on 'year' compares with a number or a date"),
        ({"tags": {"in": []}}, "'in' on 'tags' takes a list of 1 to 100 values"),
        ({"tags": {"in": "faq"}}, "'in' on 'tags' takes a list"),
        ({"tags": {}}, "The condition on 'tags' is empty"),
        ({"tags": ["a"]}, "must be a string, a number, true, false or null"),
        ({"score": float("nan")}, "finite number"),
        ({"": 1}, "field name must be a non-empty string"),
        ({"k": "a\x00b"}, "NUL"),
        ({f"k{i}": i for i in range(21)}, "at most 20"),
    ],
)
def test_a_bad_filter_says_how_to_write_it(spec, message):
    with pytest.raises(FilterError, match=re.escape(message)):
        MetadataFilter.parse(spec)


# --- applied in the search ------------------------------------------------------------------

MODEL = "filter-test-16"
DIMENSIONS = 16

DOCUMENTS = {
    "faq-2021": {"tags": ["faq", "howto"], "year": 2021, "published": "2021-06-01", "source_type": "md"},
    "faq-2024": {"tags": "faq", "year": 2024, "published": "2024-02-29T10:00:00Z", "source_type": "pdf"},
    "guide-2019": {"tags": ["guide"], "year": 2019, "published": "2019-12-31", "source_type": "pdf"},
    "odd-types": {"tags": 7, "year": "2021", "published": 20210601},
    "bare": {},
}


@pytest.fixture
def library(db) -> None:
    collection = default_collection()
    rng = random.Random(1)
    for title, metadata in DOCUMENTS.items():
        document = Document.objects.create(
            collection=collection, title=title, content=title, content_hash=title, metadata=metadata
        )
        Chunk.objects.bulk_create(
            Chunk(
                document=document,
                collection=collection,
                position=p,
                text=f"{title} part {p}",
                heading="",
                token_count=3,
                embedding=[rng.uniform(-1, 1) for _ in range(DIMENSIONS)],
                embedding_model=MODEL,
            )
            for p in range(3)
        )


def titles(spec, *, k: int = 20, text: str = "") -> set[str]:
    query = QueryVector.from_floats([0.5] * DIMENSIONS)
    sources = retrieval.search(query, embedding_model=MODEL, k=k, text=text, metadata=MetadataFilter.parse(spec))
    return {s.title for s in sources}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, set(DOCUMENTS)),
        ({"tags": "faq"}, {"faq-2021", "faq-2024"}),  # a list containing it, or equal to it
        ({"tags": {"in": ["howto", "guide"]}}, {"faq-2021", "guide-2019"}),
        ({"year": {"gte": 2020}}, {"faq-2021", "faq-2024"}),  # "2021" is text, not a number
        ({"year": {"gt": 2019, "lte": 2021}}, {"faq-2021"}),
        ({"published": {"gte": "2021-01-01", "lt": "2025"}}, {"faq-2021", "faq-2024"}),
        ({"source_type": "pdf", "year": {"lt": 2022}}, {"guide-2019"}),
        ({"missing": "x"}, set()),
        ({"tags": 7}, {"odd-types"}),
    ],
)
def test_a_filter_keeps_exactly_the_matching_documents(library, spec, expected, settings):
    assert titles(spec) == expected
    settings.RAG_HYBRID_WEIGHT = 0.3  # the full-text half of a hybrid search is filtered too
    assert titles(spec, text="faq part guide") == expected


def test_a_filter_is_a_parameter_not_sql(library):
    # Quotes and a path in the value are data: they neither break the statement nor match.
    assert titles({"tags": 'faq" || $.year == 2019 || "x'}) == set()
    assert titles({'tags") OR true --': "faq"}) == set()


def test_filtered_recall_holds_when_the_filter_keeps_five_percent(transactional_db):
    """2,000 indexed chunks, 5% of them in documents the filter keeps: the search still
    returns k chunks, all matching, and the same as an exact search among the kept ones
    (pgvector's iterative index scan keeps looking past the ones the filter drops)."""
    model, dimensions = "filter-recall-32", 32
    collection = default_collection()
    vectors = unit_vectors(2000, dimensions, seed=11)
    kept: dict[int, list[float]] = {}
    for d in range(40):
        tag = "rare" if d in (7, 29) else "common"
        document = Document.objects.create(
            collection=collection, title=f"doc {d}", content=str(d), content_hash=f"h{d}", metadata={"tag": tag}
        )
        chunks = Chunk.objects.bulk_create(
            Chunk(
                document=document,
                collection=collection,
                position=p,
                text=f"{d}/{p}",
                token_count=1,
                embedding=vectors[d * 50 + p],
                embedding_model=model,
            )
            for p in range(50)
        )
        if tag == "rare":
            kept.update({c.pk: vectors[d * 50 + p] for p, c in enumerate(chunks)})
    ensure_vector_index(embedding_model=model, dimensions=dimensions)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    rare = MetadataFilter.parse({"tag": "rare"})
    hits = 0
    for query in unit_vectors(10, dimensions, seed=12):
        found = retrieval.search(QueryVector.from_floats(query), embedding_model=model, k=10, metadata=rare)
        assert len(found) == 10
        assert all(s.title in ("doc 7", "doc 29") for s in found)
        hits += len({s.chunk_id for s in found} & set(brute_force(kept, query, 10)))
    assert hits / 100 >= 0.95
