"""Query-time retrieval: embed the question once, search pgvector once."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.db.models import QuerySet

from rag.models import Chunk
from rag.providers import EmbeddingProvider

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


@dataclass(frozen=True, slots=True)
class Retrieval:
    sources: list[Source]
    ms: float


#: Which collections a search may read: ids, a Collection QuerySet (kept as a
#: subquery, so it costs no extra trip to the database), or None for all.
CollectionScope = Iterable[int] | QuerySet | None


def search(vector: list[float], *, embedding_model: str, k: int, collections: CollectionScope = None) -> list[Source]:
    """The k nearest chunks to a query vector (sync: call it from a thread).

    One query whatever the scope: the collection filter and the readable-collections
    subquery run inside it. With a selective filter, pgvector's iterative HNSW scan
    (hnsw.iterative_scan, set per connection in settings) keeps looking until it has
    k matches; relaxed order may return them slightly out of order, so they are sorted.
    """
    chunks = (
        Chunk.objects.in_collections(collections)
        .nearest(vector, embedding_model=embedding_model, dimensions=len(vector), k=k)
        .select_related("document")
        .defer("embedding", "document__content", "document__metadata")
    )
    chunks = sorted(chunks, key=lambda chunk: chunk.distance)
    return [
        Source(
            n=n,
            chunk_id=chunk.pk,
            document_id=chunk.document_id,
            title=chunk.document.title,
            source=chunk.document.source,
            heading=chunk.heading,
            text=chunk.text,
            score=1.0 - float(chunk.distance),
        )
        for n, chunk in enumerate(chunks, start=1)
    ]


async def retrieve(
    *, question: str, k: int, embedder: EmbeddingProvider, collections: CollectionScope = None
) -> Retrieval:
    started = time.perf_counter()
    [vector] = await embedder.embed([question])
    sources = await sync_to_async(search)(vector, embedding_model=embedder.model, k=k, collections=collections)
    return Retrieval(sources=sources, ms=(time.perf_counter() - started) * 1000)
