"""Query-time retrieval: embed the question once, search Postgres once (the SQL itself is
in rag.services.search_sql), then, if RAG_RERANKER_MODEL names one, let a cross-encoder
reorder what was found."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.db.models import QuerySet

from rag.batching import Batcher
from rag.models import Reader
from rag.providers import EmbeddingProvider, QueryVector, Reranker, reranker
from rag.services import search_sql
from rag.services.connections import release_connection
from rag.services.metadata_filter import MetadataFilter
from rag.services.search_sql import Shape

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

#: One query of a batch: its vector, the reader's user id (or None), and its text (the
#: full-text half of a hybrid search; "" searches by the vector alone).
_Query = tuple[QueryVector, int | None, str]


def search(
    vector: QueryVector,
    *,
    embedding_model: str,
    k: int,
    collections: CollectionScope = None,
    text: str = "",
    metadata: MetadataFilter | None = None,
) -> list[Source]:
    """The k best chunks for a query (sync: call it from a thread; ``asearch`` from async code).

    The nearest chunks, scored with their document's similarity (RAG_DOCUMENT_WEIGHT) and
    the BM25 of ``text`` (RAG_HYBRID_WEIGHT), as rag.services.search_sql says. One
    statement whatever the scope: the collection filter and the readable-collections
    subquery run inside it.
    With a selective filter, pgvector's iterative HNSW scan (hnsw.iterative_scan, set
    per connection in settings) keeps looking until it has k matches.
    """
    [sources] = search_many(
        [vector], embedding_model=embedding_model, k=k, collections=collections, texts=[text], metadata=metadata
    )
    return sources


def search_many(
    vectors: list[QueryVector],
    *,
    embedding_model: str,
    k: int,
    collections: CollectionScope = None,
    texts: list[str] | None = None,
    metadata: MetadataFilter | None = None,
) -> list[list[Source]]:
    """``search`` for several queries of one dimension, in one statement."""
    shape, reader_id = _shape(collections)
    texts = texts or [""] * len(vectors)
    queries = [(v, reader_id, t) for v, t in zip(vectors, texts, strict=True)]
    return _search_rows(queries, embedding_model=embedding_model, k=k, shape=shape, metadata=metadata)


async def asearch(
    vector: QueryVector,
    *,
    embedding_model: str,
    k: int,
    collections: CollectionScope = None,
    text: str = "",
    metadata: MetadataFilter | None = None,
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
        [sources] = await _search_rows_and_release([(vector, reader_id, text)], embedding_model, k, shape, metadata)
        return sources
    return await _searches(embedding_model, vector.dimensions, k, shape, metadata).submit((vector, reader_id, text))


def _shape(collections: CollectionScope) -> tuple[Shape | QuerySet, int | None]:
    """What the search's SQL depends on, and the user id it leaves to run time."""
    if isinstance(collections, Reader):
        if collections.superuser or collections.user_id is None:
            return collections, None  # the same statement for all of them already
        # Signed-in users: who they are only matters to the group-membership subquery.
        return replace(collections, user_id=search_sql.READER_ID), collections.user_id
    if collections is None or isinstance(collections, QuerySet):
        return collections, None
    return tuple(collections), None


@functools.lru_cache(maxsize=256)
def _searches(
    embedding_model: str, dimensions: int, k: int, shape: Shape, metadata: MetadataFilter | None
) -> Batcher[_Query, list[Source]]:
    async def run(queries: list[_Query]) -> list[list[Source]]:
        return await _search_rows_and_release(queries, embedding_model, k, shape, metadata)

    return Batcher(run, max_size=64)


# Not thread-sensitive: a batch serves many requests and may outlive the one that
# started it, so it must not run on that request's thread.
@sync_to_async(thread_sensitive=False)
def _search_rows_and_release(
    queries: list[_Query], embedding_model: str, k: int, shape: Shape | QuerySet, metadata: MetadataFilter | None
) -> list[list[Source]]:
    try:
        return _search_rows(queries, embedding_model=embedding_model, k=k, shape=shape, metadata=metadata)
    finally:
        release_connection()


def _search_rows(
    queries: list[_Query],
    *,
    embedding_model: str,
    k: int,
    shape: Shape | QuerySet,
    metadata: MetadataFilter | None = None,
) -> list[list[Source]]:
    """One statement for a batch of queries (rag.services.search_sql)."""
    if not queries:
        return []
    dimensions = queries[0][0].dimensions
    if any(vector.dimensions != dimensions for vector, _, _ in queries):
        raise ValueError("one statement searches query vectors of one dimension")
    plan = search_sql.Plan(
        embedding_model=embedding_model,
        dimensions=dimensions,
        k=k,
        shape=None if isinstance(shape, QuerySet) else shape,
        lexical_weight=settings.RAG_HYBRID_WEIGHT if any(text for _, _, text in queries) else 0.0,
        document_weight=settings.RAG_DOCUMENT_WEIGHT,
        candidates=settings.RAG_SEARCH_CANDIDATES,
        fulltext_candidates=settings.RAG_FULLTEXT_CANDIDATES if any(text for _, _, text in queries) else 0,
        document_candidates=settings.RAG_DOCUMENT_CANDIDATES,
        chunk_tokens=settings.RAG_CHUNK_TOKENS,
        text_search_config=settings.RAG_TEXT_SEARCH_CONFIG,
        metadata=metadata,
    )
    sql, params = search_sql.statement(plan, shape if isinstance(shape, QuerySet) else None)
    # The vectors go as one text[] literal, not a list: psycopg quotes a list of long strings
    # element by element in Python (8% of the server's CPU with 1,000 questions at once).
    # A vector literal holds only digits, signs, dots, commas and brackets: nothing to escape.
    vectors = "{" + ",".join(f'"{v.literal}"' for v, _, _ in queries) + "}"
    readers = [reader for _, reader, _ in queries]
    texts = [text for _, _, text in queries]
    with connection.cursor() as cursor:
        # The HNSW scan keeps hnsw.ef_search candidates (RAG_HNSW_EF_SEARCH, 60): asking for
        # more chunks than half that lost recall (k=40 at 40 missed up to 42% of the exact
        # nearest on the Debian FAQ eval), so a large k widens it for its own statement.
        # Candidates for scoring need ef_search at least as large, or the scan returns fewer.
        scored = plan.document_weight or plan.lexical_weight or plan.fulltext_candidates or plan.document_candidates
        ef_search = max(2 * k, plan.candidates if scored else 0)
        widen = ef_search > settings.RAG_HNSW_EF_SEARCH
        if widen:
            cursor.execute("SELECT set_config('hnsw.ef_search', %s, false)", [str(ef_search)])
        try:
            cursor.execute(sql, (vectors, readers, texts, *params))
            rows = cursor.fetchall()
        finally:
            if widen:
                cursor.execute("RESET hnsw.ef_search")  # back to the connection's own setting
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


async def rerank(*, question: str, sources: list[Source], k: int, reranker: Reranker) -> list[Source]:
    """The k of ``sources`` the reranker scores highest for ``question``, best first and
    numbered from 1. Each keeps its cosine ``score``: what clients see stays one scale."""
    if not sources:
        return []
    # The heading path says what a chunk is about when its text leaves that implicit.
    texts = [f"{s.heading}\n\n{s.text}" if s.heading else s.text for s in sources]
    scores = await reranker.scores(question, texts)
    # sorted() is stable, reverse=True included: ties keep the order search gave them.
    order = sorted(range(len(sources)), key=scores.__getitem__, reverse=True)
    return [replace(sources[i], n=n) for n, i in enumerate(order[:k], start=1)]


async def retrieve(
    *,
    question: str,
    k: int,
    embedder: EmbeddingProvider,
    collections: CollectionScope = None,
    metadata: MetadataFilter | None = None,
) -> Retrieval:
    """The k best chunks for ``question``: searched, then reranked when RAG_RERANKER_MODEL
    is set. ``ms`` is the whole of it, reranking included."""
    started = time.perf_counter()
    cross_encoder = reranker()
    # A reranker can only promote what search found: it gets more candidates than k.
    wanted = max(k, settings.RAG_RERANK_CANDIDATES) if cross_encoder is not None else k
    vector = await embedder.embed_query(question)
    sources = await asearch(
        vector, embedding_model=embedder.model, k=wanted, collections=collections, text=question, metadata=metadata
    )
    if cross_encoder is not None:
        sources = await rerank(question=question, sources=sources, k=k, reranker=cross_encoder)
    return Retrieval(sources=sources, ms=(time.perf_counter() - started) * 1000)
