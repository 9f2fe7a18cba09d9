"""Query-time retrieval: embed the question once, search pgvector once."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from asgiref.sync import sync_to_async
from django.db import connection
from django.db.models import QuerySet

from rag.batching import Batcher
from rag.models import Chunk, Reader
from rag.providers import EmbeddingProvider, QueryVector
from rag.services.connections import release_connection

SNIPPET_CHARS = 240


@dataclass(frozen=True, slots=True)
class Source:
    n: int  # the number the model cites: [n]
    chunk_id: int
    document_id: int
    title: str
    source: str
    heading: str
    text: str
    score: float  # cosine similarity, 1 = identical

    @property
    def snippet(self) -> str:
        text = " ".join(self.text.split())
        return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1].rstrip() + "…"

    def public(self) -> dict:
        """What clients see (SSE ``sources`` event, JSON API, stored on the message)."""
        return {
            "id": self.chunk_id,
            "n": self.n,
            "document_id": self.document_id,
            "title": self.title,
            "source": self.source,
            "heading": self.heading,
            "snippet": self.snippet,
            "score": round(self.score, 4),
        }

    @classmethod
    def from_public(cls, data: dict, n: int) -> Source:
        """A source as stored on a message by ``public()`` (the snippet stands in for the text)."""
        return cls(
            n=int(data.get("n", n)),
            chunk_id=int(data.get("id", 0)),
            document_id=int(data.get("document_id", 0)),
            title=str(data.get("title", "")),
            source=str(data.get("source", "")),
            heading=str(data.get("heading", "")),
            text=str(data.get("snippet", "")),
            score=float(data.get("score", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class Retrieval:
    sources: list[Source]
    ms: float


#: Which collections a search may read: what a Reader may read, ids, a Collection
#: QuerySet (kept as a subquery, so it costs no extra trip to the database), or None for all.
CollectionScope = Reader | Iterable[int] | QuerySet | None

_COLUMNS = ("pk", "document_id", "document__title", "document__source", "heading", "text", "distance")
# Stand in for the query vector and for the reader's user id while the ORM compiles the search.
_QUERY_VECTOR = "[the query vector]"
# No user has this id; it fits in a 32-bit id column (out of range, the ORM drops the condition).
_READER_ID = -(2**31) + 1

#: What a search's SQL depends on besides the model, dimension and k (hashable).
Shape = Reader | tuple[int, ...] | None


def search(vector: QueryVector, *, embedding_model: str, k: int, collections: CollectionScope = None) -> list[Source]:
    """The k nearest chunks to a query vector (sync: call it from a thread; ``asearch`` from async code).

    One query whatever the scope: the collection filter and the readable-collections
    subquery run inside it. With a selective filter, pgvector's iterative HNSW scan
    (hnsw.iterative_scan, set per connection in settings) keeps looking until it has
    k matches; relaxed order may return them slightly out of order, so they are sorted.
    """
    [sources] = search_many([vector], embedding_model=embedding_model, k=k, collections=collections)
    return sources


def search_many(
    vectors: list[QueryVector], *, embedding_model: str, k: int, collections: CollectionScope = None
) -> list[list[Source]]:
    """``search`` for several query vectors of one dimension, in one statement."""
    shape, reader_id = _shape(collections)
    return _search_rows([(v, reader_id) for v in vectors], embedding_model=embedding_model, k=k, shape=shape)


async def asearch(
    vector: QueryVector, *, embedding_model: str, k: int, collections: CollectionScope = None
) -> list[Source]:
    """``search`` for async code, in a thread; the database connection goes back to the
    pool afterwards (an answer may stream for a while).

    Searches of one shape made at the same time share a statement: under a burst of
    questions that is one thread hop and one round trip for many, instead of one
    each while the event loop waits. Signed-in users with the same flags (staff or
    not) are one shape too: who is asking is a column of the batch.
    """
    shape, reader_id = _shape(collections)
    if isinstance(shape, QuerySet):  # not hashable: searched on its own
        [sources] = await _search_rows_and_release([(vector, reader_id)], embedding_model, k, shape)
        return sources
    return await _searches(embedding_model, vector.dimensions, k, shape).submit((vector, reader_id))


def _shape(collections: CollectionScope) -> tuple[Shape | QuerySet, int | None]:
    """What the search's SQL depends on, and the user id it leaves to run time."""
    if isinstance(collections, Reader):
        if collections.superuser or collections.user_id is None:
            return collections, None  # the same statement for all of them already
        # Signed-in users: who they are only matters to the group-membership subquery.
        return replace(collections, user_id=_READER_ID), collections.user_id
    if collections is None or isinstance(collections, QuerySet):
        return collections, None
    return tuple(collections), None


@functools.lru_cache(maxsize=256)
def _searches(
    embedding_model: str, dimensions: int, k: int, shape: Shape
) -> Batcher[tuple[QueryVector, int | None], list[Source]]:
    async def run(queries: list[tuple[QueryVector, int | None]]) -> list[list[Source]]:
        return await _search_rows_and_release(queries, embedding_model, k, shape)

    return Batcher(run, max_size=64)


# Not thread-sensitive: a batch serves many requests and may outlive the one that
# started it, so it must not run on that request's thread.
@sync_to_async(thread_sensitive=False)
def _search_rows_and_release(
    queries: list[tuple[QueryVector, int | None]], embedding_model: str, k: int, shape: Shape | QuerySet
) -> list[list[Source]]:
    try:
        return _search_rows(queries, embedding_model=embedding_model, k=k, shape=shape)
    finally:
        release_connection()


def _search_rows(
    queries: list[tuple[QueryVector, int | None]], *, embedding_model: str, k: int, shape: Shape | QuerySet
) -> list[list[Source]]:
    """One statement for several (query vector, reader's user id): the search runs once per
    query inside a LATERAL join over them, each through the HNSW index as on its own
    (tests/test_db.py checks the plan)."""
    if not queries:
        return []
    dimensions = queries[0][0].dimensions
    if any(vector.dimensions != dimensions for vector, _ in queries):
        raise ValueError("one statement searches query vectors of one dimension")
    sql, params = _search_sql(embedding_model, dimensions, k, shape)
    # The vectors go as one text[] literal, not a list: psycopg quotes a list of long strings
    # element by element in Python (8% of the server's CPU with 1,000 questions at once).
    # A vector literal holds only digits, signs, dots, commas and brackets: nothing to escape.
    vectors = "{" + ",".join(f'"{v.literal}"' for v, _ in queries) + "}"
    with connection.cursor() as cursor:
        cursor.execute(sql, (vectors, [reader for _, reader in queries], *params))
        rows = cursor.fetchall()
    found: list[list[Source]] = [[] for _ in queries]
    for i, pk, document_id, title, source, heading, text, distance in rows:
        sources = found[i - 1]
        sources.append(
            Source(
                n=len(sources) + 1,
                chunk_id=pk,
                document_id=document_id,
                title=title,
                source=source,
                heading=heading,
                text=text,
                score=1.0 - float(distance),
            )
        )
    return found


def _search_sql(embedding_model: str, dimensions: int, k: int, shape: Shape | QuerySet) -> tuple[str, tuple]:
    """The batched search's SQL, and its parameters after the two arrays (vectors, readers).

    Building and compiling the QuerySet costs ~0.8 ms of CPU, as much as the
    search itself takes in Postgres, and every search before a first token paid
    it while the event loop waited for the GIL. The SQL depends only on the
    model, the dimension, k and the shape, so it is compiled once per shape.
    """
    if isinstance(shape, QuerySet):  # not hashable: compiled each time
        return _compile(embedding_model, dimensions, k, shape)
    return _compiled(embedding_model, dimensions, k, shape)


@functools.lru_cache(maxsize=512)
def _compiled(embedding_model: str, dimensions: int, k: int, shape: Shape) -> tuple[str, tuple]:
    return _compile(embedding_model, dimensions, k, shape)


def _compile(embedding_model: str, dimensions: int, k: int, shape: Shape | QuerySet) -> tuple[str, tuple]:
    queryset = (
        Chunk.objects.in_collections(shape)
        .nearest(_QUERY_VECTOR, embedding_model=embedding_model, dimensions=dimensions, k=k)
        # Plain tuples, not model instances: this runs before every first token.
        .values_list(*_COLUMNS)
    )
    sql, params = queryset.query.sql_with_params()
    # The ORM's SQL has a %s per parameter (a literal percent sign would be %%):
    # the stand-ins become references to the columns of the batch.
    pieces = sql.split("%s")
    if len(pieces) != len(params) + 1:
        raise RuntimeError(f"Unexpected placeholders in {sql!r}")
    columns = {_QUERY_VECTOR: f"q.vector::vector({dimensions})", _READER_ID: "q.reader"}
    inner, kept, placed = pieces[0], [], 0
    for param, piece in zip(params, pieces[1:], strict=True):
        stand_in = columns.get(param) if isinstance(param, (str, int)) and not isinstance(param, bool) else None
        if stand_in is None:
            kept.append(param)
        placed += param == _QUERY_VECTOR
        inner += (stand_in or "%s") + piece
    if placed != 1:
        raise RuntimeError(f"Cannot place the query vector in {sql!r}")
    # The vectors are parsed once, as vector[]: left as text, a search that the planner answers
    # with an exact scan (a small or a narrowly filtered collection) parsed the query vector
    # again for every row, 66 ms instead of 3.8 ms for 2,404 chunks of 384 dimensions.
    batched = (
        "SELECT q.i, r.* FROM unnest(%s::text[]::vector[], %s::bigint[]) WITH ORDINALITY AS q(vector, reader, i) "
        f"CROSS JOIN LATERAL ({inner}) AS r ORDER BY q.i, r.distance"
    )
    return batched, tuple(kept)


async def retrieve(
    *, question: str, k: int, embedder: EmbeddingProvider, collections: CollectionScope = None
) -> Retrieval:
    started = time.perf_counter()
    vector = await embedder.embed_query(question)
    sources = await asearch(vector, embedding_model=embedder.model, k=k, collections=collections)
    return Retrieval(sources=sources, ms=(time.perf_counter() - started) * 1000)
