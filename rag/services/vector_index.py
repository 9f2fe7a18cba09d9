"""One HNSW index per embedding model.

Chunk.embedding has no fixed dimension, so that chunks of several models can
live side by side (during a switch of models, say). HNSW needs a fixed
dimension, so each model gets a partial expression index:

    CREATE INDEX ... USING hnsw ((embedding::vector(384)) vector_cosine_ops)
    WHERE embedding_model = 'all-MiniLM-L6-v2'

and ChunkQuerySet.nearest() queries with the same cast and filter, which is
what makes the planner choose it. The index is created the first time chunks
of a model are stored, so a new model needs no migration. The documents'
vectors (rag.models.DocumentVector) get the same index, in the same step:
search proposes the chunks of the documents nearest to a question too
(rag.services.search_sql).

A bulk load into a model that has no index yet (a first import, ``RAG.aadd``
of many texts) runs inside ``deferred_vector_indexes()``: its chunks are stored
without an index and the index is built once at the end, because pgvector
builds an index from stored rows several times faster than it inserts rows
into one (docs/benchmarks.md). Meanwhile a search of that model is exact.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
from collections.abc import AsyncIterator

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from psycopg.sql import Literal

from rag.services.connections import release_connection

logger = logging.getLogger(__name__)

#: pgvector's HNSW limit for the ``vector`` type.
HNSW_MAX_DIMENSIONS = 2000

_ensured: set[tuple[str, int]] = set()
# Inside deferred_vector_indexes(): the indexes it will build, model -> dimensions.
_deferred: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar("rag_deferred_index", default=None)


def index_name(embedding_model: str, dimensions: int, *, table: str = "rag_chunk") -> str:
    """The HNSW index of one model's vectors in ``table`` (rag_chunk or rag_documentvector)."""
    digest = hashlib.sha1(f"{embedding_model}:{dimensions}".encode()).hexdigest()[:12]
    prefix = "rag_chunk" if table == "rag_chunk" else "rag_docvec"
    return f"{prefix}_hnsw_{digest}"


def ensure_vector_index(*, embedding_model: str, dimensions: int) -> None:
    """Create the HNSW index for this model if it does not exist (idempotent)."""
    key = (embedding_model, dimensions)
    if key in _ensured:
        return
    if dimensions > HNSW_MAX_DIMENSIONS:
        logger.warning(
            "%s has %d dimensions, over pgvector's HNSW limit of %d: search will be exact (slower). "
            "Set RAG_EMBEDDING_DIMENSIONS to shorten the vectors if the model supports it.",
            embedding_model,
            dimensions,
            HNSW_MAX_DIMENSIONS,
        )
        _ensured.add(key)
        return
    name = index_name(embedding_model, dimensions)
    deferred = _deferred.get()
    if deferred is not None and (deferred.get(embedding_model) == dimensions or not _exists(name)):
        deferred[embedding_model] = dimensions
        return
    create_indexes(embedding_model=embedding_model, dimensions=dimensions)
    # Inside a transaction the index may yet be rolled back: remember it only
    # once it is committed.
    if not connection.in_atomic_block:
        _ensured.add(key)
    logger.info("HNSW index %s ready for %s (%d dimensions)", name, embedding_model, dimensions)


def create_indexes(*, embedding_model: str, dimensions: int) -> None:
    """CREATE INDEX IF NOT EXISTS, for the chunks' and the documents' vectors of one model.
    (Migration 0013 repeats it for the documents of models stored before it.)"""
    model = Literal(embedding_model).as_string(connection.connection)
    with connection.cursor() as cursor:
        for table in ("rag_chunk", "rag_documentvector"):
            # DDL takes no parameters: the name is a hex digest, the dimension an int, and
            # the model name is quoted by psycopg.
            cursor.execute(
                f"CREATE INDEX IF NOT EXISTS {index_name(embedding_model, dimensions, table=table)} ON {table} "
                f"USING hnsw ((embedding::vector({int(dimensions)})) vector_cosine_ops) "
                f"WITH (m = {int(settings.RAG_HNSW_M)}, ef_construction = {int(settings.RAG_HNSW_EF_CONSTRUCTION)}) "
                f"WHERE embedding_model = {model}"
            )


def _exists(name: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_indexes WHERE tablename = 'rag_chunk' AND indexname = %s", [name])
        return cursor.fetchone() is not None


@contextlib.asynccontextmanager
async def deferred_vector_indexes() -> AsyncIterator[None]:
    """Store chunks of models without an index yet unindexed, then build each index once.

    A model whose index exists keeps it maintained on every insert. The indexes
    are built however the block ends, so rows stored before a failure are
    indexed too.
    """
    pending: dict[str, int] = {}
    token = _deferred.set(pending)
    try:
        yield
    finally:
        _deferred.reset(token)
        for embedding_model, dimensions in pending.items():
            await sync_to_async(_build)(embedding_model, dimensions)


def _build(embedding_model: str, dimensions: int) -> None:
    try:
        ensure_vector_index(embedding_model=embedding_model, dimensions=dimensions)
    finally:
        release_connection()
