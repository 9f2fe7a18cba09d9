"""Answering a question as a stream of events: retrieve, prompt, stream the LLM, save.

    sources → token … token → metrics          (or → error)

The streaming transports run it inside an answer's generation (rag.answers.generate),
which puts its events in the answer's log; ``/rag/query``, ``manage.py ask`` and the
Python API read it directly.

Retrieval runs once, before generation. However the stream ends (completion,
an upstream failure, or the consumer going away: ``aclose()``, a client
disconnect, task cancellation), the answer is saved with its final status,
text, sources and metrics; on an early end the upstream LLM request is closed
at once and the partial text kept as ``stopped``.

Saving is one write at the end, batched with the answers that end at the same
moment: for a question read directly (``stream_answer``) the question and its
answer are stored together; an answer made up front (``open_turn``,
``open_new_turn``, so that it has an id and a log before it streams) is filled
in by the ``save`` that ``saver_for`` gives ``generate``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from itertools import pairwise

from django.conf import settings

from rag.models import Conversation, Message
from rag.providers import (
    ChatProvider,
    EmbeddingProvider,
    ProviderError,
    chat_provider,
    embedding_provider,
)
from rag.services import answer_rows
from rag.services.answer_rows import rounded
from rag.services.metadata_filter import MetadataFilter
from rag.services.prompting import build_prompt
from rag.services.retrieval import CollectionScope, Source, retrieve

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
    retrieval_ms: float | None
    ttft_ms: float | None
    total_ms: float
    tokens: int
    tokens_per_s: float | None
    gap_p50_ms: float | None
    gap_p95_ms: float | None
    gap_max_ms: float | None
    finish_reason: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Error:
    message: str
    code: str
    message_id: int | None = None


AnswerEvent = Sources | Token | Metrics | Error


@dataclass(frozen=True, slots=True)
class TokenGaps:
    """How steadily an answer's tokens arrived; None where fewer than two tokens came."""

    p50_ms: float | None = None
    p95_ms: float | None = None
    max_ms: float | None = None
    tokens_per_s: float | None = None


def token_gap_stats(times: list[float]) -> TokenGaps:
    """The gaps between consecutive token arrivals (``times``: ``perf_counter`` seconds, in
    order) and the rate from the first token to the last, which leaves the wait for the
    first token out: that is ``ttft_ms``."""
    if len(times) < 2:
        return TokenGaps()
    gaps = sorted((later - earlier) * 1000 for earlier, later in pairwise(times))
    span = times[-1] - times[0]
    return TokenGaps(
        p50_ms=_nearest_rank(gaps, 50),
        p95_ms=_nearest_rank(gaps, 95),
        max_ms=gaps[-1],
        tokens_per_s=(len(times) - 1) / span if span > 0 else None,
    )


def _nearest_rank(ordered: list[float], percent: int) -> float:
    # Nearest rank, not interpolation: always a gap that happened, and with the few
    # gaps of a short answer p95 is its largest one rather than a blend of two.
    # percent * n first: an exact integer, where percent / 100 * n can overshoot one.
    return ordered[max(1, math.ceil(percent * len(ordered) / 100)) - 1]


@dataclass
class Outcome:
    """How an answer ended: what ``generate`` hands to the code that saves it."""

    status: str = Message.Status.STOPPED
    text: str = ""
    error: ProviderError | None = None
    sources: list[Source] = field(default_factory=list)
    model: str = ""
    embedding_model: str = ""
    retrieval_ms: float | None = None
    ttft_ms: float | None = None
    total_ms: float = 0.0
    tokens: int = 0
    gaps: TokenGaps = field(default_factory=TokenGaps)
    finish_reason: str = ""

    def metrics(self, message: Message) -> Metrics:
        return Metrics(
            message_id=message.pk,
            conversation_id=str(message.conversation_id),
            status=self.status,
            model=self.model,
            embedding_model=self.embedding_model,
            retrieval_ms=rounded(self.retrieval_ms),
            ttft_ms=rounded(self.ttft_ms),
            total_ms=round(self.total_ms, 2),
            tokens=self.tokens,
            tokens_per_s=rounded(self.gaps.tokens_per_s),
            gap_p50_ms=rounded(self.gaps.p50_ms),
            gap_p95_ms=rounded(self.gaps.p95_ms),
            gap_max_ms=rounded(self.gaps.max_ms),
            finish_reason=self.finish_reason,
        )


SaveAnswer = Callable[[Outcome], Awaitable[Message]]


def stream_answer(
    *,
    question: str,
    k: int,
    conversation: Conversation | None = None,
    user_id: int | None = None,
    session_key: str = "",
    chat: ChatProvider | None = None,
    embedder: EmbeddingProvider | None = None,
    collections: CollectionScope = None,
    metadata: MetadataFilter | None = None,
) -> AsyncIterator[AnswerEvent]:
    """Answer a one-shot question; it is saved with its answer when the answer ends.

    Only chunks of ``collections`` are searched (None: every collection; the web
    views pass the collections the asking user may read), and of documents whose
    metadata matches ``metadata``."""

    async def save(outcome: Outcome) -> Message:
        return await answer_rows.save_turn(
            question=question, conversation=conversation, user_id=user_id, session_key=session_key, outcome=outcome
        )

    return generate(
        question=question, k=k, save=save, chat=chat, embedder=embedder, collections=collections, metadata=metadata
    )


async def generate(
    *,
    question: str,
    k: int,
    save: SaveAnswer,
    chat: ChatProvider | None = None,
    embedder: EmbeddingProvider | None = None,
    search_query: str | None = None,
    history: list[dict[str, str]] | None = None,
    collections: CollectionScope = None,
    metadata: MetadataFilter | None = None,
) -> AsyncIterator[AnswerEvent]:
    """Retrieve, stream the answer, and ``save`` the outcome however the stream ends.

    ``search_query`` is what retrieval embeds when it differs from the question (a
    follow-up condensed with its conversation); ``history`` is the earlier turns as
    chat messages, put between the sources and the question.
    """
    started = time.perf_counter()
    chat = chat or chat_provider()
    embedder = embedder or embedding_provider()
    outcome = Outcome(model=chat.model, embedding_model=embedder.model)
    parts: list[str] = []
    arrivals: list[float] = []  # perf_counter() at each token; the statistics wait for the end

    def elapsed_ms() -> float:
        return (time.perf_counter() - started) * 1000

    try:
        # retrieve, as the admin's "Try a query" does: search, then the reranker if one is set.
        found = await retrieve(
            question=search_query or question, k=k, embedder=embedder, collections=collections, metadata=metadata
        )
        outcome.sources = found.sources
        outcome.retrieval_ms = elapsed_ms()
        yield Sources(outcome.sources)

        messages = await build_prompt(
            chat=chat,
            question=question,
            sources=outcome.sources,
            history=history or [],
            max_tokens=settings.RAG_MAX_TOKENS,
        )
        stream = chat.stream(messages, max_tokens=settings.RAG_MAX_TOKENS, temperature=settings.RAG_TEMPERATURE)
        async with aclosing(stream):
            async for chunk in stream:
                if chunk.finish_reason:
                    outcome.finish_reason = chunk.finish_reason
                if chunk.text:
                    arrived = time.perf_counter()
                    if not arrivals:
                        outcome.ttft_ms = (arrived - started) * 1000
                    arrivals.append(arrived)
                    parts.append(chunk.text)
                    yield Token(chunk.text)
        outcome.status = Message.Status.COMPLETE
    except ProviderError as exc:
        # Whoever asked sees what failed and what to do; the addresses are for the log.
        logger.warning("Answering %r failed (%s): %s", question[:80], exc.code, exc.message)
        outcome.status, outcome.error = Message.Status.ERROR, exc.public()
    except Exception as exc:
        logger.exception("Answering %r failed", question[:80])
        outcome.status = Message.Status.ERROR
        outcome.error = ProviderError(
            f"The answer failed unexpectedly ({type(exc).__name__}); see the server log.", code="internal"
        )
    finally:
        # Reached on completion, on error, and when the consumer leaves
        # (GeneratorExit / CancelledError): the partial answer is never lost.
        outcome.text = "".join(parts)
        outcome.tokens = len(parts)
        outcome.gaps = token_gap_stats(arrivals)
        outcome.total_ms = elapsed_ms()
        if outcome.status == Message.Status.STOPPED:
            outcome.finish_reason = "stopped"
        message = await save(outcome)
    if outcome.error is not None:
        yield Error(message=outcome.error.message, code=outcome.error.code, message_id=message.pk)
    else:
        yield outcome.metrics(message)
