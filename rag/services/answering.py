"""Answering a question as a stream of events: the one service every transport uses.

    sources → token … token → metrics          (or → error)

Retrieval runs once, before generation. The question and the answer are
saved as messages; the answer is saved with its final status whatever ends
the stream: completion, an upstream failure, or the consumer going away
(``aclose()``, a client disconnect, task cancellation), in which case the
upstream LLM request is closed at once and the partial text kept as stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import asdict, dataclass

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection, transaction

from rag.models import Conversation, Message
from rag.providers import ChatProvider, EmbeddingProvider, ProviderError, chat_provider, embedding_provider
from rag.services.prompting import build_messages
from rag.services.retrieval import CollectionScope, Source, search

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Sources:
    sources: list[Source]


@dataclass(frozen=True, slots=True)
class Token:
    text: str


@dataclass(frozen=True, slots=True)
class Metrics:
    message_id: int
    conversation_id: str
    status: str
    model: str
    embedding_model: str
    retrieval_ms: float
    ttft_ms: float | None
    total_ms: float
    tokens: int
    finish_reason: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Error:
    message: str
    code: str
    message_id: int | None = None


AnswerEvent = Sources | Token | Metrics | Error


async def stream_answer(
    *,
    question: str,
    k: int,
    conversation: Conversation | None = None,
    user_id: int | None = None,
    session_key: str = "",
    chat: ChatProvider | None = None,
    embedder: EmbeddingProvider | None = None,
    collections: CollectionScope = None,
) -> AsyncIterator[AnswerEvent]:
    """Answer ``question`` from the chunks of ``collections`` (None: every collection;
    the web views pass the collections the asking user may read)."""
    started = time.perf_counter()
    chat = chat or chat_provider()
    embedder = embedder or embedding_provider()

    def elapsed_ms() -> float:
        return (time.perf_counter() - started) * 1000

    try:
        [vector] = await embedder.embed([question])
        embed_error = None
    except ProviderError as exc:
        vector, embed_error = None, exc
    # One trip to the database before the first token: save the question,
    # search, and hand the connection back to the pool for the (long) generation.
    answer, sources = await _begin(
        question=question,
        vector=vector,
        k=k,
        embedding_model=embedder.model,
        collections=collections,
        conversation=conversation,
        user_id=user_id,
        session_key=session_key,
        model=chat.model,
        error=embed_error.message if embed_error else "",
    )
    retrieval_ms = elapsed_ms()
    if embed_error is not None:
        yield Error(message=embed_error.message, code=embed_error.code, message_id=answer.pk)
        return
    yield Sources(sources)

    messages = build_messages(question=question, sources=sources, context_chars=settings.RAG_CONTEXT_CHARS)
    parts: list[str] = []
    ttft_ms: float | None = None
    finish_reason = ""
    status, error = Message.Status.STOPPED, None
    try:
        stream = chat.stream(messages, max_tokens=settings.RAG_MAX_TOKENS, temperature=settings.RAG_TEMPERATURE)
        async with aclosing(stream):
            async for chunk in stream:
                if chunk.finish_reason:
                    finish_reason = chunk.finish_reason
                if chunk.text:
                    if ttft_ms is None:
                        ttft_ms = elapsed_ms()
                    parts.append(chunk.text)
                    yield Token(chunk.text)
        status = Message.Status.COMPLETE
    except ProviderError as exc:
        status, error = Message.Status.ERROR, exc
    except Exception as exc:
        logger.exception("Answer %s failed", answer.pk)
        status = Message.Status.ERROR
        error = ProviderError(
            f"The answer failed unexpectedly ({type(exc).__name__}); see the server log.", code="internal"
        )
    finally:
        # Reached on completion, on error, and when the consumer leaves
        # (GeneratorExit / CancelledError): the partial answer is never lost.
        metrics = Metrics(
            message_id=answer.pk,
            conversation_id=str(answer.conversation_id),
            status=status,
            model=chat.model,
            embedding_model=embedder.model,
            retrieval_ms=round(retrieval_ms, 2),
            ttft_ms=round(ttft_ms, 2) if ttft_ms is not None else None,
            total_ms=round(elapsed_ms(), 2),
            tokens=len(parts),
            finish_reason=finish_reason or ("stopped" if status == Message.Status.STOPPED else ""),
        )
        await _finish_answer(
            answer,
            text="".join(parts),
            status=status,
            error=error.message if error else "",
            sources=[s.public() for s in sources],
            metrics=metrics,
        )
    if error is not None:
        yield Error(message=error.message, code=error.code, message_id=answer.pk)
    else:
        yield metrics


@sync_to_async
def _begin(
    *,
    question: str,
    vector: list[float] | None,
    k: int,
    embedding_model: str,
    collections: CollectionScope,
    conversation: Conversation | None,
    user_id: int | None,
    session_key: str,
    model: str,
    error: str,
) -> tuple[Message, list[Source]]:
    with transaction.atomic():
        if conversation is None:
            conversation = Conversation.objects.create(
                user_id=user_id, session_key=session_key, title=" ".join(question.split())[:200]
            )
        _question, answer = Message.objects.bulk_create(
            [
                Message(conversation=conversation, role=Message.Role.USER, text=question),
                Message(
                    conversation=conversation,
                    role=Message.Role.ASSISTANT,
                    status=Message.Status.ERROR if error else Message.Status.STREAMING,
                    error=error,
                    model=model,
                ),
            ]
        )
    sources = (
        search(vector, embedding_model=embedding_model, k=k, collections=collections) if vector is not None else []
    )
    _release_connection_sync()
    return answer, sources


@sync_to_async
def _finish_answer(
    answer: Message,
    *,
    text: str,
    status: str,
    error: str = "",
    sources: list[dict] | None = None,
    metrics: Metrics | None = None,
) -> None:
    # Postgres text cannot hold NUL; a model can still emit one.
    answer.text = text.replace("\x00", "\ufffd")
    answer.status = status
    answer.error = error.replace("\x00", "\ufffd")
    answer.sources = sources or []
    if metrics is not None:
        answer.retrieval_ms = metrics.retrieval_ms
        answer.ttft_ms = metrics.ttft_ms
        answer.total_ms = metrics.total_ms
        answer.tokens = metrics.tokens
        answer.finish_reason = metrics.finish_reason
    answer.save()
    _release_connection_sync()


def _release_connection_sync() -> None:
    # Inside a transaction (tests, an outer atomic block) the connection must stay.
    if not connection.in_atomic_block:
        connection.close()
