"""Query-time retrieval: embed the question once, search pgvector once."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.db import connection
from django.db.models import QuerySet

from rag.models import Chunk, Reader
from rag.providers import EmbeddingProvider, QueryVector

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
# Stands in for the query vector while the ORM compiles the search.
_QUERY_VECTOR = "[the query vector]"


def search(vector: QueryVector, *, embedding_model: str, k: int, collections: CollectionScope = None) -> list[Source]:
    """The k nearest chunks to a query vector (sync: call it from a thread).

    One query whatever the scope: the collection filter and the readable-collections
    subquery run inside it. With a selective filter, pgvector's iterative HNSW scan
    (hnsw.iterative_scan, set per connection in settings) keeps looking until it has
    k matches; relaxed order may return them slightly out of order, so they are sorted.
    """
    sql, params, slot = _search_sql(embedding_model, vector.dimensions, k, collections)
    params = (*params[:slot], vector.literal, *params[slot + 1 :])
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = sorted(cursor.fetchall(), key=lambda row: row[-1])
    return [
        Source(
            n=n,
            chunk_id=pk,
            document_id=document_id,
            title=title,
            source=source,
            heading=heading,
            text=text,
            score=1.0 - float(distance),
        )
        for n, (pk, document_id, title, source, heading, text, distance) in enumerate(rows, start=1)
    ]


def _search_sql(embedding_model: str, dimensions: int, k: int, collections: CollectionScope) -> tuple[str, tuple, int]:
    """The search's SQL, its parameters, and where the query vector goes among them.

    Building and compiling the QuerySet costs ~0.8 ms of CPU, as much as the
    search itself takes in Postgres; every search before a first token paid it
    while the event loop waited for the GIL. The SQL depends only on the model,
    the dimension, k and the scope, so it is compiled once per such shape.
    """
    if isinstance(collections, QuerySet):  # not hashable: compiled each time
        return _compile(embedding_model, dimensions, k, collections)
    if collections is not None and not isinstance(collections, Reader):
        collections = tuple(collections)
    return _compiled(embedding_model, dimensions, k, collections)


@functools.lru_cache(maxsize=512)
def _compiled(
    embedding_model: str, dimensions: int, k: int, collections: Reader | tuple[int, ...] | None
) -> tuple[str, tuple, int]:
    return _compile(embedding_model, dimensions, k, collections)


def _compile(embedding_model: str, dimensions: int, k: int, collections: CollectionScope) -> tuple[str, tuple, int]:
    queryset = (
        Chunk.objects.in_collections(collections)
        .nearest(_QUERY_VECTOR, embedding_model=embedding_model, dimensions=dimensions, k=k)
        # Plain tuples, not model instances: this runs before every first token.
        .values_list(*_COLUMNS)
    )
    sql, params = queryset.query.sql_with_params()
    return sql, tuple(params), params.index(_QUERY_VECTOR)


async def retrieve(
    *, question: str, k: int, embedder: EmbeddingProvider, collections: CollectionScope = None
) -> Retrieval:
    started = time.perf_counter()
    vector = await embedder.embed_query(question)
    sources = await sync_to_async(search)(vector, embedding_model=embedder.model, k=k, collections=collections)
    return Retrieval(sources=sources, ms=(time.perf_counter() - started) * 1000)
