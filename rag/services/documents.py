"""Adding documents to the knowledge base: chunk, embed in batches, store atomically."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import IntegrityError, transaction

from rag.models import Chunk, Document
from rag.providers import EmbeddingProvider, embedding_provider
from rag.services.chunking import ChunkDraft, chunk_text
from rag.services.vector_index import ensure_vector_index


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
    created: bool  # False: the same text was already in the knowledge base
    chunks: int


class EmptyDocumentError(ValueError):
    pass


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def guess_title(text: str, source: str = "") -> str:
    for line in text.splitlines():
        if line := re.sub(r"^#+\s*", "", line).strip():
            return line[:200]
    return source.rsplit("/", 1)[-1][:200] or "Untitled"


async def aadd_documents(
    *,
    documents: Iterable[DocumentInput | str],
    embedder: EmbeddingProvider | None = None,
    on_progress: Callable[[AddResult], None] | None = None,
) -> list[AddResult]:
    """Add documents (or plain strings); a text already present is not added twice."""
    embedder = embedder or embedding_provider()
    results = []
    for item in documents:
        doc = DocumentInput(text=item) if isinstance(item, str) else item
        result = await aadd_document(document=doc, embedder=embedder)
        results.append(result)
        if on_progress:
            on_progress(result)
    return results


async def aadd_document(*, document: DocumentInput, embedder: EmbeddingProvider) -> AddResult:
    text = document.text.strip()
    if not text:
        raise EmptyDocumentError(f"{document.source or document.title or 'The document'} has no text to index.")
    digest = content_hash(text)
    existing = await Document.objects.filter(content_hash=digest).afirst()
    if existing is not None:
        return await _reuse(existing, embedder)

    drafts, vectors = await _chunk_and_embed(text, embedder)
    title = document.title.strip() or guess_title(text, document.source)
    new = Document(
        title=title[:300],
        source=document.source[:1000],
        content=text,
        content_hash=digest,
        metadata=document.metadata,
    )
    try:
        await _store_chunks(new, drafts=drafts, vectors=vectors, embedding_model=embedder.model, create=True)
    except IntegrityError:
        # The same text was added concurrently; keep the first one.
        return await _reuse(await Document.objects.aget(content_hash=digest), embedder)
    return AddResult(new.pk, new.title, created=True, chunks=len(drafts))


async def aembed_document(*, document: Document, embedder: EmbeddingProvider) -> int:
    """(Re)build a stored document's chunks for ``embedder``'s model.

    The document's chunks of that model are replaced in one transaction, so
    search sees either the old chunks or the new ones, never a mix or none.
    """
    drafts, vectors = await _chunk_and_embed(document.content, embedder)
    await _store_chunks(document, drafts=drafts, vectors=vectors, embedding_model=embedder.model, create=False)
    return len(drafts)


async def _reuse(existing: Document, embedder: EmbeddingProvider) -> AddResult:
    """An already stored text: embed it for this model if it has no chunks of it yet
    (after a switch of embedding models), otherwise leave it alone."""
    chunks = await existing.chunks.filter(embedding_model=embedder.model).acount()
    if not chunks:
        chunks = await aembed_document(document=existing, embedder=embedder)
    return AddResult(existing.pk, existing.title, created=False, chunks=chunks)


async def _chunk_and_embed(text: str, embedder: EmbeddingProvider) -> tuple[list[ChunkDraft], list[list[float]]]:
    # Chunking counts tokens with the model's tokenizer: CPU work, off the loop.
    drafts = await asyncio.to_thread(
        chunk_text,
        text,
        max_tokens=settings.RAG_CHUNK_TOKENS,
        overlap=settings.RAG_CHUNK_OVERLAP,
        count_tokens=embedder.count_tokens,
    )
    batch = settings.RAG_EMBED_BATCH
    vectors: list[list[float]] = []
    for start in range(0, len(drafts), batch):
        vectors += await embedder.embed([d.embedding_text for d in drafts[start : start + batch]])
    return drafts, vectors


@sync_to_async
def _store_chunks(
    document: Document,
    *,
    drafts: list[ChunkDraft],
    vectors: list[list[float]],
    embedding_model: str,
    create: bool,
) -> None:
    if vectors:
        ensure_vector_index(embedding_model=embedding_model, dimensions=len(vectors[0]))
    # All or nothing: a document is never visible with half its chunks.
    with transaction.atomic():
        if create:
            document.save()
        else:
            document.chunks.filter(embedding_model=embedding_model).delete()
        Chunk.objects.bulk_create(
            Chunk(
                document=document,
                position=draft.position,
                text=draft.text,
                heading=draft.heading[:500],
                token_count=draft.token_count,
                embedding=vector,
                embedding_model=embedding_model,
            )
            for draft, vector in zip(drafts, vectors, strict=True)
        )
