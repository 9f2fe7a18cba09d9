"""Adding documents to the knowledge base: chunk, embed in batches, store atomically.

A document's chunks are only ever swapped in one transaction, so search sees
either the old chunks or the new ones, never a mix or none: a failed run
(a bad file, an embedding server down) leaves the previous version answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from pgvector import Vector
from pgvector.psycopg.vector import register_vector_info
from psycopg.types import TypeInfo

from rag.models import Chunk, Collection, Document, storable
from rag.providers import EmbeddingProvider, embedding_provider
from rag.services import term_stats
from rag.services.chunking import ChunkDraft, chunk_text
from rag.services.connections import release_connection
from rag.services.vector_index import deferred_vector_indexes, ensure_vector_index

#: Set (per task) when documents are added concurrently: stores then use a connection each.
_own_connection: contextvars.ContextVar[bool] = contextvars.ContextVar("rag_own_connection", default=False)

#: Called with the fraction of chunks embedded so far (0..1).
ProgressCallback = Callable[[float], Awaitable[None]]


@dataclass
class DocumentInput:
    text: str
    title: str = ""
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AddResult:
    document_id: int
    title: str
    created: bool  # False: the same text was already in the collection (or it replaced an older version)
    chunks: int
    outcome: str = "added"  # added | unchanged | replaced


class EmptyDocumentError(ValueError):
    pass


class DuplicateDocumentError(ValueError):
    """The same text is already in the collection as another document."""

    def __init__(self, existing: Document) -> None:
        super().__init__(f"The same text is already in this collection as “{existing.title}” (#{existing.pk}).")
        self.existing = existing


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def guess_title(text: str, source: str = "") -> str:
    for line in text.splitlines():
        if line := re.sub(r"^#+\s*", "", line).strip():
            return line[:200]
    return source.rsplit("/", 1)[-1][:200] or "Untitled"


def default_collection() -> Collection:
    collection, _ = Collection.objects.get_or_create(name=Collection.DEFAULT_NAME)
    return collection


async def adefault_collection() -> Collection:
    return await sync_to_async(default_collection)()


async def aadd_documents(
    *,
    documents: Iterable[DocumentInput | str],
    embedder: EmbeddingProvider | None = None,
    on_progress: Callable[[AddResult], None] | None = None,
    collection: Collection | None = None,
    concurrency: int = 1,
) -> list[AddResult]:
    """Add documents (or plain strings); a text already in the collection is not added twice.

    ``concurrency`` > 1 adds that many documents at a time, each stored on its own
    connection: the database, not Python, is the limit when embedding is fast
    (docs/benchmarks.md). The first failure is raised once the others in flight end.
    """
    embedder = embedder or embedding_provider()
    collection = collection or await adefault_collection()
    inputs = [DocumentInput(text=item) if isinstance(item, str) else item for item in documents]
    async with bulk_load():
        return await _add_all(
            inputs, embedder=embedder, on_progress=on_progress, collection=collection, concurrency=concurrency
        )


@contextlib.asynccontextmanager
async def bulk_load() -> AsyncIterator[None]:
    """Around storing many documents: a model without a vector index gets it built once at
    the end (rag.services.vector_index), and the full-text statistics are refreshed once the
    load has ended well (rag.services.term_stats), so that the first search sees them all."""
    async with deferred_vector_indexes():
        yield
    await sync_to_async(term_stats.refresh_or_warn)()


async def _add_all(
    inputs: list[DocumentInput],
    *,
    embedder: EmbeddingProvider,
    on_progress: Callable[[AddResult], None] | None,
    collection: Collection,
    concurrency: int,
) -> list[AddResult]:
    if concurrency <= 1:
        results = []
        for doc in inputs:
            result = await aadd_document(document=doc, embedder=embedder, collection=collection)
            results.append(result)
            if on_progress:
                on_progress(result)
        return results

    gate = asyncio.Semaphore(concurrency)

    async def add(doc: DocumentInput) -> AddResult:
        async with gate:
            _own_connection.set(True)
            result = await aadd_document(document=doc, embedder=embedder, collection=collection)
        if on_progress:
            on_progress(result)
        return result

    outcomes = await asyncio.gather(*(add(doc) for doc in inputs), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return list(outcomes)


async def aadd_document(
    *, document: DocumentInput, embedder: EmbeddingProvider, collection: Collection | None = None
) -> AddResult:
    """Add one document in process (no queue): the Python API and ``manage.py ingest``.

    Same text in the collection: unchanged. Same source with other text: the
    stored document is replaced, atomically.
    """
    collection = collection or await adefault_collection()
    # Postgres text cannot hold NUL.
    text = document.text.replace("\x00", "").strip()
    if not text:
        raise EmptyDocumentError(f"{document.source or document.title or 'The document'} has no text to index.")
    digest = content_hash(text)
    existing = await Document.objects.filter(collection=collection, content_hash=digest).afirst()
    if existing is not None:
        await _update_metadata(existing, document.metadata)
        return await _reuse(existing, embedder)

    previous = None
    if document.source:
        previous = await Document.objects.filter(collection=collection, source=document.source[:1000]).afirst()
    if previous is not None:
        await _update_metadata(previous, document.metadata)
        chunks = await arebuild_document(document=previous, embedder=embedder, text=text, title=document.title)
        return AddResult(previous.pk, previous.title, created=False, chunks=chunks, outcome="replaced")

    title = document.title.strip() or guess_title(text, document.source)
    drafts, vectors = await chunk_and_embed(text=text, title=title, embedder=embedder)
    new = Document(
        collection=collection,
        title=title[:300],
        source=document.source[:1000],
        content=text,
        content_hash=digest,
        metadata=document.metadata,
        status=Document.Status.READY,
        started_at=timezone.now(),
    )
    try:
        await _swap_chunks(new, drafts=drafts, vectors=vectors, embedding_model=embedder.model, create=True)
    except IntegrityError:
        # The same text was added concurrently; keep the first one.
        return await _reuse(await Document.objects.aget(collection=collection, content_hash=digest), embedder)
    return AddResult(new.pk, new.title, created=True, chunks=len(drafts))


async def aplan_document(*, document: DocumentInput, collection: Collection) -> str:
    """What aadd_document would do, without doing it: added, unchanged or replaced (for --dry-run)."""
    text = document.text.strip()
    if not text:
        raise EmptyDocumentError(f"{document.source or document.title or 'The document'} has no text to index.")
    if await Document.objects.filter(collection=collection, content_hash=content_hash(text)).aexists():
        return "unchanged"
    if document.source and await Document.objects.filter(collection=collection, source=document.source).aexists():
        return "replaced"
    return "added"


async def aembed_document(
    *, document: Document, embedder: EmbeddingProvider, on_progress: ProgressCallback | None = None
) -> int:
    """(Re)build a stored document's chunks for ``embedder``'s model from its stored text.

    The document's chunks of that model are replaced in one transaction; chunks
    of other models are left alone, so search on them keeps working meanwhile.
    """
    drafts, vectors = await chunk_and_embed(
        text=document.content, title=document.title, embedder=embedder, on_progress=on_progress
    )
    await _swap_chunks(document, drafts=drafts, vectors=vectors, embedding_model=embedder.model, create=False)
    return len(drafts)


async def arebuild_document(
    *,
    document: Document,
    embedder: EmbeddingProvider,
    text: str,
    title: str = "",
    on_progress: ProgressCallback | None = None,
    timings: dict[str, float] | None = None,
) -> int:
    """Give a stored document new text: new chunks replace all its old ones atomically.

    Raises DuplicateDocumentError if another document of the collection has that text.
    """
    text = text.strip()
    if not text:
        raise EmptyDocumentError(f"{document.source or document.title} has no text to index.")
    digest = content_hash(text)
    other = (
        await Document.objects.filter(collection_id=document.collection_id, content_hash=digest)
        .exclude(pk=document.pk)
        .afirst()
    )
    if other is not None:
        raise DuplicateDocumentError(other)
    if title.strip():
        document.title = title.strip()[:300]
    drafts, vectors = await chunk_and_embed(
        text=text, title=document.title, embedder=embedder, on_progress=on_progress, timings=timings
    )
    document.content = text
    document.content_hash = digest
    started = time.perf_counter()
    try:
        await _swap_chunks(
            document, drafts=drafts, vectors=vectors, embedding_model=embedder.model, create=False, all_models=True
        )
    except IntegrityError:
        # Another document took this text in the meantime.
        other = (
            await Document.objects.filter(collection_id=document.collection_id, content_hash=digest)
            .exclude(pk=document.pk)
            .afirst()
        )
        if other is None:
            raise
        raise DuplicateDocumentError(other) from None
    if timings is not None:
        timings["store_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return len(drafts)


async def _update_metadata(document: Document, metadata: dict[str, Any]) -> None:
    """Metadata given again for a stored document replaces what it had (a re-run of
    ``ingest --meta`` with other values, say)."""
    if metadata and metadata != document.metadata:
        document.metadata = metadata
        await Document.objects.filter(pk=document.pk).aupdate(metadata=metadata)


async def _reuse(existing: Document, embedder: EmbeddingProvider) -> AddResult:
    """An already stored text: embed it for this model if it has no chunks of it yet
    (after a switch of embedding models), otherwise leave it alone."""
    chunks = await existing.chunks.filter(embedding_model=embedder.model).acount()
    if not chunks:
        chunks = await aembed_document(document=existing, embedder=embedder)
    return AddResult(existing.pk, existing.title, created=False, chunks=chunks, outcome="unchanged")


async def chunk_and_embed(
    *,
    text: str,
    title: str,
    embedder: EmbeddingProvider,
    on_progress: ProgressCallback | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[list[ChunkDraft], list[list[float]]]:
    started = time.perf_counter()
    # Chunking counts tokens with the model's tokenizer: CPU work, off the loop.
    drafts = await asyncio.to_thread(
        chunk_text,
        text,
        max_tokens=settings.RAG_CHUNK_TOKENS,
        overlap=settings.RAG_CHUNK_OVERLAP,
        min_tokens=settings.RAG_CHUNK_MIN_TOKENS,
        count_tokens=embedder.count_tokens,
    )
    chunked = time.perf_counter()
    batch = settings.RAG_EMBED_BATCH
    vectors: list[list[float]] = []
    for start in range(0, len(drafts), batch):
        vectors += await embedder.embed([d.embedding_text(title) for d in drafts[start : start + batch]])
        if on_progress is not None:
            await on_progress(len(vectors) / len(drafts))
    if timings is not None:
        timings["chunk_ms"] = round((chunked - started) * 1000, 1)
        timings["embed_ms"] = round((time.perf_counter() - chunked) * 1000, 1)
    return drafts, vectors


async def _swap_chunks(document: Document, **kwargs: Any) -> None:
    if _own_connection.get():
        # Several documents at once: each store in its own thread, so on its own
        # connection, and the database inserts into the HNSW index in parallel.
        await sync_to_async(_swap_chunks_on_own_connection, thread_sensitive=False)(document, **kwargs)
    else:
        await sync_to_async(_swap_chunks_sync)(document, **kwargs)


def _swap_chunks_on_own_connection(document: Document, **kwargs: Any) -> None:
    try:
        _swap_chunks_sync(document, **kwargs)
    finally:
        release_connection()  # this thread may not come back


def _swap_chunks_sync(
    document: Document,
    *,
    drafts: list[ChunkDraft],
    vectors: list[list[float]],
    embedding_model: str,
    create: bool,
    all_models: bool = False,
) -> None:
    if vectors:
        ensure_vector_index(embedding_model=embedding_model, dimensions=len(vectors[0]))
    document.status = Document.Status.READY
    document.progress = 1.0
    document.error = ""
    document.chunk_count = len(drafts)
    document.embedding_model = embedding_model
    document.finished_at = timezone.now()
    # All or nothing: a document is never visible with half its chunks.
    with transaction.atomic():
        if create:
            document.save()
        else:
            # New text makes the chunks of every model stale; a re-embedding only its own model's.
            old = document.chunks.all() if all_models else document.chunks.filter(embedding_model=embedding_model)
            old.delete()
            stale = document.vectors.all() if all_models else document.vectors.filter(embedding_model=embedding_model)
            stale.delete()
            # force_update: a document deleted while it was being processed must
            # stay deleted, not come back from this save.
            document.save(force_update=True)
        _copy_chunks(document, drafts=drafts, vectors=vectors, embedding_model=embedding_model)
        _store_document_vector(document, embedding_model=embedding_model)
    term_stats.refresh_if_stale(stored=len(drafts))


def _store_document_vector(document: Document, *, embedding_model: str) -> None:
    """The document's vector: the mean of the chunks just stored (as migration 0011 computes it)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO rag_documentvector (document_id, embedding_model, embedding) "
            "SELECT document_id, embedding_model, avg(embedding) FROM rag_chunk "
            "WHERE document_id = %s AND embedding_model = %s GROUP BY document_id, embedding_model",
            [document.pk, embedding_model],
        )


_COPY_COLUMNS = (
    ("document_id", "bigint"),
    ("collection_id", "bigint"),
    ("position", "integer"),
    ("text", "text"),
    ("heading", "varchar"),
    ("token_count", "integer"),
    ("embedding", "vector"),
    ("embedding_model", "varchar"),
    ("search_config", "varchar"),
    ("created_at", "timestamptz"),
)
_vector_types: dict[str, TypeInfo] = {}


def _copy_chunks(
    document: Document, *, drafts: list[ChunkDraft], vectors: list[list[float]], embedding_model: str
) -> None:
    """Store chunks with one binary COPY: measured about 1.5x the rows/s of bulk INSERTs,
    most of it from not formatting 384 floats per row as text (docs/benchmarks.md)."""
    if not drafts:
        return
    table = Chunk._meta.db_table
    columns = ", ".join(name for name, _ in _COPY_COLUMNS)
    now = timezone.now()
    with connection.cursor() as cursor:
        raw = cursor.cursor  # psycopg's own cursor, under Django's wrapper
        # The vector type's OID differs per database (each creates the extension): cached per database name.
        name = connection.settings_dict["NAME"]
        if name not in _vector_types:
            _vector_types[name] = TypeInfo.fetch(raw.connection, "vector")
        register_vector_info(raw, _vector_types[name])
        with raw.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types([kind for _, kind in _COPY_COLUMNS])
            for draft, vector in zip(drafts, vectors, strict=True):
                copy.write_row(
                    (
                        document.pk,
                        document.collection_id,
                        draft.position,
                        storable(draft.text),
                        storable(draft.heading[:500]),
                        draft.token_count,
                        Vector(vector),
                        embedding_model,
                        settings.RAG_TEXT_SEARCH_CONFIG,
                        now,
                    )
                )
