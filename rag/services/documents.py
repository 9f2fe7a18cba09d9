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
from django.db import transaction

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
        chunks = await existing.chunks.filter(embedding_model=embedder.model).acount()
        return AddResult(existing.pk, existing.title, created=False, chunks=chunks)

    # Chunking counts tokens with the model's tokenizer: CPU work, off the loop.
    drafts = await asyncio.to_thread(
        chunk_text,
        text,
        max_tokens=settings.RAG_CHUNK_TOKENS,
        overlap=settings.RAG_CHUNK_OVERLAP,
        count_tokens=embedder.count_tokens,
    )
    vectors = await embed_drafts(drafts=drafts, embedder=embedder)
    title = document.title.strip() or guess_title(text, document.source)
    doc = await _store(
        document=Document(
            title=title[:300],
            source=document.source[:1000],
            content=text,
            content_hash=digest,
            metadata=document.metadata,
        ),
        drafts=drafts,
        vectors=vectors,
        embedding_model=embedder.model,
    )
    return AddResult(doc.pk, doc.title, created=True, chunks=len(drafts))


async def embed_drafts(*, drafts: list[ChunkDraft], embedder: EmbeddingProvider) -> list[list[float]]:
    batch = settings.RAG_EMBED_BATCH
    vectors: list[list[float]] = []
    for start in range(0, len(drafts), batch):
        vectors += await embedder.embed([d.embedding_text for d in drafts[start : start + batch]])
    return vectors


@sync_to_async
def _store(
    *, document: Document, drafts: list[ChunkDraft], vectors: list[list[float]], embedding_model: str
) -> Document:
    # All or nothing: a document is never visible with half its chunks.
    if vectors:
        ensure_vector_index(embedding_model=embedding_model, dimensions=len(vectors[0]))
    with transaction.atomic():
        document.save()
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
    return document
