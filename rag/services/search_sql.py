"""The search's SQL: one statement for a batch of queries, dense or hybrid.

Each query of a batch is a row of ``unnest(vectors, readers, texts)``, and the search
runs once per row inside a LATERAL join, each through the HNSW index as it would on
its own (tests/test_db.py checks the plan).

- Dense: the k chunks nearest to the query vector (cosine distance).
- With a document weight: the ``candidates`` nearest chunks, ordered by their cosine
  similarity plus ``weight`` times their document's (rag.models.DocumentVector): a
  chunk of a page about the question outranks one that only resembles it inside a long
  page about something else (docs/benchmarks.md has the eval that chose it).
- Hybrid: the ``candidates`` nearest chunks and the ``candidates`` best full-text
  matches, ordered by ``(1 - w) * cosine similarity + w * full-text rank``, the rank
  divided by the best one among the query's candidates so that both lie in 0..1.
  The full-text query is ``websearch_to_tsquery``: every word of the question (minus
  stop words), "quoted phrases", ``or`` and ``-word`` as a search box takes them.
  ORing the words instead scored the same on the eval (within a query or two) but made
  Postgres rank every chunk holding any common word: 35 ms at 5,000 chunks, growing
  with the table (bench/scale_bench.py).

The scope (the readable collections, and documents by metadata) is compiled by the
ORM from ``Chunk.objects.in_collections(...).matching(...)``, so the permission rules
stay in one place (rag.models); the SQL around it depends only on the ``Plan``, so it
is built once per plan and cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from django.db import DEFAULT_DB_ALIAS
from django.db.models import QuerySet

from rag.models import Chunk, Reader
from rag.services.metadata_filter import MetadataFilter

#: What a search's scope compiles from: a Reader (what it may read), collection ids,
#: or None for every collection. A Collection QuerySet is accepted too, uncached.
Shape = Reader | tuple[int, ...] | None

#: Stands in for the reader's user id while the ORM compiles the scope; the statement
#: takes it from the batch instead. No user has this id, and it fits a 32-bit id column
#: (out of range, the ORM would drop the condition).
READER_ID = -(2**31) + 1


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the statement depends on (hashable: statements are cached per plan)."""

    embedding_model: str
    dimensions: int
    k: int
    shape: Shape
    #: Weight of the full-text rank, 0..1; 0 is dense search alone.
    lexical_weight: float = 0.0
    #: Weight of the document's similarity (its vector: the mean of its chunks') added to
    #: each chunk's; 0 ranks chunks by their own similarity alone.
    document_weight: float = 0.0
    #: Chunks taken from each side before scoring (hybrid, or a document weight).
    candidates: int = 40
    #: Postgres text-search configuration of the query (hybrid only).
    text_search_config: str = "english"
    #: Only chunks of documents whose metadata matches.
    metadata: MetadataFilter | None = None


def statement(plan: Plan, queryset_scope: QuerySet | None = None) -> tuple[str, tuple]:
    """The batched search for ``plan``, and its parameters after the batch's three arrays
    (vectors, readers, texts). Each result row: (query number from 1, chunk id, document
    id, title, source, heading, text, cosine distance), in rank order per query.

    Compiling the ORM's part costs ~0.8 ms of CPU, as much as a search takes in Postgres,
    and every first token waited for it: hence the cache. A Collection QuerySet as the
    scope (``queryset_scope``) is not hashable, so that one is compiled each time.
    """
    if queryset_scope is not None:
        return _build(plan, queryset_scope)
    return _cached(plan)


@functools.lru_cache(maxsize=512)
def _cached(plan: Plan) -> tuple[str, tuple]:
    return _build(plan, None)


def _build(plan: Plan, queryset_scope: QuerySet | None) -> tuple[str, tuple]:
    where, where_params = _scope(plan, queryset_scope)
    distance = _distance("rag_chunk", plan.dimensions)
    batch = "unnest(%s::text[]::vector[], %s::bigint[], %s::text[]) WITH ORDINALITY AS q(vector, reader, text, i)"
    if plan.lexical_weight <= 0 and plan.document_weight <= 0:
        sql = (
            f"SELECT q.i, r.id, r.document_id, d.title, d.source, r.heading, r.text, r.distance FROM {batch} "
            "CROSS JOIN LATERAL ("
            f"SELECT rag_chunk.id, rag_chunk.document_id, rag_chunk.heading, rag_chunk.text, {distance} AS distance "
            f"FROM rag_chunk WHERE {where} ORDER BY {distance} LIMIT {int(plan.k)}"
            ") AS r JOIN rag_document d ON d.id = r.document_id ORDER BY q.i, r.distance"
        )
        return sql, tuple(where_params)

    # The candidates: (id, document_id, distance, full-text rank), distances computed once.
    n = max(int(plan.candidates), int(plan.k))
    dense = (
        f"SELECT rag_chunk.id, rag_chunk.document_id, {distance} AS distance, 0::real AS rank "
        f"FROM rag_chunk WHERE {where} ORDER BY {distance} LIMIT {n}"
    )
    params = list(where_params)
    if plan.lexical_weight > 0:
        query = "websearch_to_tsquery(%s::regconfig, q.text)"
        pool = (
            f"SELECT c.id, c.document_id, {_distance('c', plan.dimensions)} AS distance, m.rank "
            "FROM (SELECT u.id, max(u.rank) AS rank FROM ("
            f"(SELECT id, rank FROM ({dense}) AS nearest) "
            "UNION ALL "
            "(SELECT rag_chunk.id, ts_rank(rag_chunk.search_vector, t.query) "
            f"FROM rag_chunk, (SELECT {query}) AS t(query) "
            f"WHERE {where} AND rag_chunk.search_vector @@ t.query ORDER BY 2 DESC LIMIT {n})"
            ") AS u GROUP BY u.id) AS m JOIN rag_chunk c ON c.id = m.id"
        )
        params += [plan.text_search_config, *where_params]
    else:
        pool = dense

    similarity = "(1 - p.distance)"
    join = ""
    if plan.document_weight > 0:
        # A document without its vector yet (stored a moment later) counts as its chunk.
        d = int(plan.dimensions)
        document = f"(1 - coalesce(v.embedding::vector({d}) <=> q.vector::vector({d}), p.distance))"
        similarity = f"({similarity} + {float(plan.document_weight)!r} * {document})"
        join = "LEFT JOIN rag_documentvector v ON v.document_id = p.document_id AND v.embedding_model = %s "
        params.append(plan.embedding_model)
    w = float(plan.lexical_weight)
    score = similarity
    if w > 0:
        score = f"{1 - w!r} * {similarity} + {w!r} * coalesce(p.rank / nullif(max(p.rank) OVER (), 0), 0)"
    sql = (
        f"SELECT q.i, r.id, r.document_id, d.title, d.source, c.heading, c.text, r.distance FROM {batch} "
        "CROSS JOIN LATERAL ("
        f"SELECT p.id, p.document_id, p.distance, {score} AS score FROM ({pool}) AS p {join}"
        f"ORDER BY score DESC LIMIT {int(plan.k)}"
        ") AS r JOIN rag_chunk c ON c.id = r.id JOIN rag_document d ON d.id = r.document_id "
        "ORDER BY q.i, r.score DESC"
    )
    return sql, tuple(params)


def _distance(table: str, dimensions: int) -> str:
    # Written as the HNSW index's expression (rag.services.vector_index), so that the
    # planner can order by the index.
    d = int(dimensions)
    return f"{table}.embedding::vector({d}) <=> q.vector::vector({d})"


def _scope(plan: Plan, queryset_scope: QuerySet | None) -> tuple[str, list]:
    """The WHERE clause that keeps one model's chunks in the readable collections (and the
    documents the metadata filter keeps), as the ORM writes it, with the reader's user id
    taken from the batch."""
    queryset = (
        Chunk.objects.in_collections(queryset_scope if queryset_scope is not None else plan.shape)
        .matching(plan.metadata.jsonpath if plan.metadata else None)
        .for_model(plan.embedding_model)
    )
    sql, params = queryset.query.get_compiler(using=DEFAULT_DB_ALIAS).compile(queryset.query.where)
    # The ORM's SQL has a %s per parameter (a literal percent sign would be %%).
    pieces = sql.split("%s")
    if len(pieces) != len(params) + 1:
        raise RuntimeError(f"Unexpected placeholders in {sql!r}")
    where, kept = pieces[0], []
    for param, piece in zip(params, pieces[1:], strict=True):
        if isinstance(param, int) and not isinstance(param, bool) and param == READER_ID:
            where += "q.reader" + piece
        else:
            kept.append(param)
            where += "%s" + piece
    return where, kept
