"""The database side of search: pgvector, the per-model HNSW indexes, and nearest()."""

from __future__ import annotations

import math
import random

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, transaction

from rag.models import Chunk, Reader
from rag.providers import ProviderError, QueryVector, embedding_provider
from rag.providers.fake import FakeEmbeddings
from rag.services import documents, retrieval, search_sql, vector_index
from rag.services.documents import aadd_documents
from rag.services.vector_index import ensure_vector_index, index_name
from tests.factories import add_corpus, document_with_chunks

pytestmark = pytest.mark.django_db(transaction=True)

#: Enough rows for the planner to prefer the HNSW index over a sequential scan and sort
#: (at a few hundred 64-d rows it still sorts, which is the right call there).
INDEXED_ROWS = 2000


@pytest.fixture(autouse=True)
def _fresh_index_cache(monkeypatch):
    """ensure_vector_index remembers, per process, which indexes it made; start each test
    without that memory so that each test proves its own index gets created."""
    monkeypatch.setattr(vector_index, "_ensured", set())


def unit_vectors(n: int, dimensions: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    vectors = []
    for _ in range(n):
        v = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
        norm = math.sqrt(sum(x * x for x in v))
        vectors.append([x / norm for x in v])
    return vectors


def cosine_distance(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return 1.0 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def analyze() -> None:
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE rag_chunk")


def indexdef(name: str) -> str | None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'rag_chunk' AND indexname = %s", [name])
        row = cursor.fetchone()
    return row[0] if row else None


def brute_force(rows: dict[int, list[float]], query: list[float], k: int) -> list[int]:
    return sorted(rows, key=lambda pk: (cosine_distance(rows[pk], query), pk))[:k]


def test_vector_extension_is_installed_at_0_8_or_later():
    with connection.cursor() as cursor:
        cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        row = cursor.fetchone()
    assert row is not None, "the migrations did not create the vector extension"
    version = tuple(int(part) for part in row[0].split(".")[:2])
    assert version >= (0, 8), row[0]


async def test_adding_documents_creates_the_hnsw_index_for_the_model():
    embedder = embedding_provider()
    [dimensions] = {len(v) for v in await embedder.embed(["probe"])}
    name = index_name(embedder.model, dimensions)
    await add_corpus()
    definition = await sync_to_async(indexdef)(name)
    assert definition is not None, f"no index {name} after adding documents"
    assert "USING hnsw" in definition
    assert "vector_cosine_ops" in definition
    assert f"vector({dimensions})" in definition
    assert f"'{embedder.model}'" in definition  # the partial-index predicate names the model


def test_ensure_vector_index_is_idempotent_and_quotes_the_model_name():
    model = 'it\'s a "model"; DROP TABLE rag_chunk; --'
    ensure_vector_index(embedding_model=model, dimensions=8)
    vector_index._ensured.clear()
    ensure_vector_index(embedding_model=model, dimensions=8)  # IF NOT EXISTS: no error the second time
    definition = indexdef(index_name(model, 8))
    assert definition is not None and "it''s a" in definition
    document_with_chunks(unit_vectors(3, 8, seed=1), model=model)
    assert Chunk.objects.filter(embedding_model=model).count() == 3


def test_index_names_differ_per_model_and_dimension():
    names = {index_name(m, d) for m in ("a", "b") for d in (8, 16)}
    assert len(names) == 4
    assert all(len(n) <= 63 for n in names)  # Postgres truncates longer identifiers


def test_nearest_uses_the_hnsw_index():
    model = "explain-64"
    document_with_chunks(unit_vectors(INDEXED_ROWS, 64, seed=2), model=model)
    ensure_vector_index(embedding_model=model, dimensions=64)
    analyze()
    [query] = unit_vectors(1, 64, seed=3)
    plan = Chunk.objects.nearest(query, embedding_model=model, dimensions=64, k=5).explain()
    assert f"Index Scan using {index_name(model, 64)}" in plan, plan
    assert "Sort" not in plan.split("Index Scan")[0], plan  # ordered by the index, not sorted afterwards


def test_nearest_matches_brute_force_on_a_small_table():
    # A small table is scanned exactly: the top k must match a Python ranking exactly.
    model = "exact-16"
    vectors = unit_vectors(60, 16, seed=4)
    chunks = document_with_chunks(vectors, model=model)
    rows = {c.pk: v for c, v in zip(chunks, vectors, strict=True)}
    for query in unit_vectors(5, 16, seed=5):
        found = list(Chunk.objects.nearest(query, embedding_model=model, dimensions=16, k=7))
        assert [c.pk for c in found] == brute_force(rows, query, 7)
        for chunk in found:
            assert chunk.distance == pytest.approx(cosine_distance(rows[chunk.pk], query), abs=1e-5)


def test_nearest_through_the_index_finds_the_true_neighbours():
    model = "recall-64"
    vectors = unit_vectors(INDEXED_ROWS, 64, seed=6)
    chunks = document_with_chunks(vectors, model=model)
    rows = {c.pk: v for c, v in zip(chunks, vectors, strict=True)}
    ensure_vector_index(embedding_model=model, dimensions=64)
    analyze()
    queries = unit_vectors(10, 64, seed=7)
    hits = 0
    # On a table this small the planner may rightly search exactly (at hnsw.ef_search 60 it
    # does): what is checked is what the index finds, so sequential scans are off.
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        qs = Chunk.objects.nearest(queries[0], embedding_model=model, dimensions=64, k=5)
        assert index_name(model, 64) in qs.explain()
        for query in queries:
            found = list(Chunk.objects.nearest(query, embedding_model=model, dimensions=64, k=5))
            expected = brute_force(rows, query, 5)
            # HNSW is approximate, so this compares sets (ties and near-ties may reorder).
            hits += len({c.pk for c in found} & set(expected))
            distances = [c.distance for c in found]
            assert distances == sorted(distances)
            for chunk in found:
                assert chunk.distance == pytest.approx(cosine_distance(rows[chunk.pk], query), abs=1e-5)
    # Measured: recall 1.0 on every run; HNSW's level assignment is random per build, so
    # this allows a single miss out of 50 rather than demanding exactness.
    assert hits / (5 * len(queries)) >= 0.98
    # A stored vector is its own nearest neighbour, at distance 0.
    [top] = Chunk.objects.nearest(vectors[123], embedding_model=model, dimensions=64, k=1)
    assert top.pk == chunks[123].pk and top.distance == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("rows", [40, INDEXED_ROWS], ids=["scan", "index"])
def test_chunks_of_another_model_are_never_returned(rows):
    mine = unit_vectors(rows, 32, seed=8)
    document_with_chunks(mine, model="mine-32")
    # The other model's vectors include exact copies of the queries: they would win if mixed in.
    queries = unit_vectors(3, 32, seed=9)
    document_with_chunks(queries + unit_vectors(rows, 32, seed=10), model="other-32", title="other")
    for model in ("mine-32", "other-32"):
        ensure_vector_index(embedding_model=model, dimensions=32)
    analyze()
    plan = Chunk.objects.nearest(queries[0], embedding_model="mine-32", dimensions=32, k=10).explain()
    assert (index_name("mine-32", 32) in plan) == (rows == INDEXED_ROWS), plan
    for query in queries:
        found = list(Chunk.objects.nearest(query, embedding_model="mine-32", dimensions=32, k=10))
        assert len(found) == 10
        assert {c.embedding_model for c in found} == {"mine-32"}
        assert all(c.distance > 1e-3 for c in found)
        [other] = Chunk.objects.nearest(query, embedding_model="other-32", dimensions=32, k=1)
        assert other.embedding_model == "other-32" and other.distance == pytest.approx(0.0, abs=1e-5)


def test_models_of_different_dimensions_get_their_own_indexes_and_coexist():
    models = {"small-16": 16, "large-48": 48}
    stored = {}
    for seed, (model, dimensions) in enumerate(models.items()):
        vectors = unit_vectors(INDEXED_ROWS, dimensions, seed=20 + seed)
        stored[model] = (document_with_chunks(vectors, model=model, title=model), vectors)
        ensure_vector_index(embedding_model=model, dimensions=dimensions)
    analyze()
    names = {model: index_name(model, dimensions) for model, dimensions in models.items()}
    assert len(set(names.values())) == 2
    for model, dimensions in models.items():
        definition = indexdef(names[model])
        assert definition is not None
        assert f"vector({dimensions})" in definition and f"'{model}'" in definition
        chunks, vectors = stored[model]
        qs = Chunk.objects.nearest(vectors[7], embedding_model=model, dimensions=dimensions, k=3)
        plan = qs.explain()
        assert f"Index Scan using {names[model]}" in plan, plan
        found = list(qs)
        assert found[0].pk == chunks[7].pk
        assert {c.embedding_model for c in found} == {model}
        assert all(len(c.embedding) == dimensions for c in found)


def test_small_table_of_mixed_dimensions_is_searchable_without_indexes():
    # Without an index Postgres scans; the filter on the model must come before the cast,
    # or casting another model's vectors to this dimension would fail.
    document_with_chunks(unit_vectors(5, 16, seed=30), model="a-16", title="a")
    b = unit_vectors(5, 24, seed=31)
    b_chunks = document_with_chunks(b, model="b-24", title="b")
    [top] = Chunk.objects.nearest(b[2], embedding_model="b-24", dimensions=24, k=1)
    assert top.pk == b_chunks[2].pk


def test_index_made_inside_a_rolled_back_transaction_is_made_again():
    # ensure_vector_index remembers indexes it created; if the CREATE INDEX was rolled
    # back with an enclosing transaction, that memory must not stop it creating the index again.
    model = "rolled-back-8"

    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), transaction.atomic():
        ensure_vector_index(embedding_model=model, dimensions=8)
        assert indexdef(index_name(model, 8)) is not None
        raise Rollback
    assert indexdef(index_name(model, 8)) is None
    ensure_vector_index(embedding_model=model, dimensions=8)
    assert indexdef(index_name(model, 8)) is not None


@pytest.mark.parametrize(
    ("lexical_weight", "document_weight", "fulltext_candidates", "document_candidates"),
    [(0.0, 0.0, 0, 0), (0.3, 2.5, 0, 0), (0.3, 2.5, 0, 10), (0.3, 2.5, 40, 10)],
    ids=["chunks alone", "scored (the default)", "with document candidates", "with full-text candidates"],
)
def test_a_batch_of_searches_still_goes_through_the_hnsw_index(
    lexical_weight, document_weight, fulltext_candidates, document_candidates
):
    model = "explain-batch-64"
    [chunk, *_] = document_with_chunks(unit_vectors(INDEXED_ROWS, 64, seed=8), model=model)
    documents._store_document_vector(chunk.document, embedding_model=model)
    ensure_vector_index(embedding_model=model, dimensions=64)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # statistics of earlier tests' rows would mislead the planner
    literals = [QueryVector.from_floats(v).literal for v in unit_vectors(3, 64, seed=9)]
    # Without a scope, and as readers who may read what they may read (anonymous, a user).
    # On a table this small the planner may rightly search exactly; what is checked is
    # that the rewritten statement can still take the index, with sequential scans off.
    for collections in (None, Reader(), Reader(user_id=1)):
        shape, _ = retrieval._shape(collections)
        plan = search_sql.Plan(
            embedding_model=model,
            dimensions=64,
            k=5,
            shape=shape,
            lexical_weight=lexical_weight,
            document_weight=document_weight,
            fulltext_candidates=fulltext_candidates,
            document_candidates=document_candidates,
        )
        sql, params = search_sql.statement(plan)
        texts = ["how do I install it", "", "postgres"]
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL enable_seqscan = off")
            cursor.execute("EXPLAIN " + sql, (literals, [None, 1, 2], texts, *params))
            plan = "\n".join(row[0] for row in cursor.fetchall())
        assert f"Index Scan using {index_name(model, 64)}" in plan, plan
        assert "Order By" in plan, plan  # the index orders each vector's neighbours
        # The nearest documents come through their own index.
        documents_index = f"Index Scan using {index_name(model, 64, table='rag_documentvector')}"
        assert (documents_index in plan) == bool(document_candidates), plan


def _record_index_during_copies(monkeypatch, name: str) -> list[bool]:
    """Whether the index existed each time a document's chunks were stored."""
    seen: list[bool] = []
    copy_chunks = documents._copy_chunks

    def recording(*args, **kwargs):
        seen.append(indexdef(name) is not None)
        return copy_chunks(*args, **kwargs)

    monkeypatch.setattr(documents, "_copy_chunks", recording)
    return seen


async def test_a_bulk_load_into_a_new_model_builds_its_index_once_at_the_end(monkeypatch):
    embedder = FakeEmbeddings(dimensions=16, model="bulk-new")
    name = index_name(embedder.model, 16)
    seen = _record_index_during_copies(monkeypatch, name)
    texts = [f"Document {i} is about topic {i} and nothing else." for i in range(6)]
    results = await aadd_documents(documents=texts, embedder=embedder, concurrency=2)
    assert seen == [False] * 6  # stored without maintaining an index...
    assert await sync_to_async(indexdef)(name) is not None  # ...which exists once the load is done
    assert sum(r.chunks for r in results) == await Chunk.objects.filter(embedding_model=embedder.model).acount()


async def test_a_bulk_load_into_an_indexed_model_keeps_its_index_maintained(monkeypatch):
    embedder = FakeEmbeddings(dimensions=16, model="bulk-indexed")
    name = index_name(embedder.model, 16)
    await sync_to_async(ensure_vector_index)(embedding_model=embedder.model, dimensions=16)
    vector_index._ensured.clear()  # as in a new process: the index exists, this process did not make it
    seen = _record_index_during_copies(monkeypatch, name)
    await aadd_documents(documents=[f"Text number {i}." for i in range(3)], embedder=embedder)
    assert seen == [True] * 3


async def test_a_bulk_load_that_fails_half_way_still_indexes_what_it_stored():
    class FailingThird(FakeEmbeddings):
        calls = 0

        async def embed(self, texts):
            self.calls += 1
            if self.calls == 3:
                raise ProviderError("the embedding server went away", code="unreachable")
            return await super().embed(texts)

    embedder = FailingThird(dimensions=16, model="bulk-failing")
    with pytest.raises(ProviderError):
        await aadd_documents(documents=[f"Paper {i} on subject {i}." for i in range(5)], embedder=embedder)
    assert await Chunk.objects.filter(embedding_model=embedder.model).aexists()
    assert await sync_to_async(indexdef)(index_name(embedder.model, 16)) is not None


def test_a_search_for_many_chunks_widens_ef_search_for_its_own_statement_only():
    model = "wide-k-64"
    vectors = unit_vectors(INDEXED_ROWS, 64, seed=21)
    chunks = document_with_chunks(vectors, model=model)
    rows = {c.pk: v for c, v in zip(chunks, vectors, strict=True)}
    ensure_vector_index(embedding_model=model, dimensions=64)
    analyze()
    statements = []
    with connection.execute_wrapper(lambda execute, sql, *rest: statements.append(sql) or execute(sql, *rest)):
        hits = 0
        for query in unit_vectors(5, 64, seed=22):
            found = retrieval.search(QueryVector.from_floats(query), embedding_model=model, k=40)
            hits += len({s.chunk_id for s in found} & set(brute_force(rows, query, 40)))
    assert hits / 200 >= 0.95
    assert sum("set_config('hnsw.ef_search'" in sql for sql in statements) == 5
    with connection.cursor() as cursor:
        cursor.execute("SHOW hnsw.ef_search")
        assert cursor.fetchone()[0] == "60"  # the connection's own setting again


def test_the_default_search_is_one_statement_at_the_connections_ef_search():
    model = "default-k-16"
    document_with_chunks(unit_vectors(10, 16, seed=23), model=model)
    statements = []
    with connection.execute_wrapper(lambda execute, sql, *rest: statements.append(sql) or execute(sql, *rest)):
        found = retrieval.search(QueryVector.from_floats(unit_vectors(1, 16, seed=24)[0]), embedding_model=model, k=4)
    assert len(found) == 4
    # The default search scores RAG_SEARCH_CANDIDATES (60) chunks, which the connection's
    # hnsw.ef_search (RAG_HNSW_EF_SEARCH, 60) already covers: nothing to widen or reset.
    assert len(statements) == 1, statements


def test_the_index_is_built_with_the_configured_graph_parameters(settings):
    settings.RAG_HNSW_M, settings.RAG_HNSW_EF_CONSTRUCTION = 8, 32
    ensure_vector_index(embedding_model="graph-params-8", dimensions=8)
    definition = indexdef(index_name("graph-params-8", 8))
    assert "m='8'" in definition and "ef_construction='32'" in definition, definition
