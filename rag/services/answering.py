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
``open_one_shot``, so that it has an id and a log before it streams) is filled
in by the ``save`` that ``saver_for`` gives ``generate``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from itertools import pairwise

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from rag.batching import Batcher
from rag.models import Conversation, Message, storable
from rag.providers import (
    ChatProvider,
    EmbeddingProvider,
    ProviderError,
    chat_provider,
    embedding_provider,
)
from rag.services.connections import release_connection
from rag.services.prompting import build_prompt
from rag.services.retrieval import CollectionScope, Source, asearch

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
) -> AsyncIterator[AnswerEvent]:
    """Answer a one-shot question; it is saved with its answer when the answer ends.

    Only chunks of ``collections`` are searched (None: every collection; the web
    views pass the collections the asking user may read)."""

    async def save(outcome: Outcome) -> Message:
        turn = _Turn(
            question=question, conversation=conversation, user_id=user_id, session_key=session_key, outcome=outcome
        )
        return await _turns.submit(turn)

    return generate(question=question, k=k, save=save, chat=chat, embedder=embedder, collections=collections)


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
        vector = await embedder.embed_query(search_query or question)
        outcome.sources = await asearch(vector, embedding_model=embedder.model, k=k, collections=collections)
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


def open_turn(
    *,
    question: str,
    conversation: Conversation | None,
    user_id: int | None,
    session_key: str,
    model: str,
    k: int | None = None,
    collection_id: int | None = None,
    claimed: bool = False,
) -> tuple[Message, Message]:
    """Save a question and the placeholder of its answer (status ``streaming``; claimed by
    the caller if ``claimed``), for transports that need the answer's id before it streams.
    Sync: the chat service calls it within its own trip to the database."""
    with transaction.atomic():
        if conversation is None:
            conversation = _new_conversation(question, user_id=user_id, session_key=session_key)
        else:
            # The sidebar lists conversations by their latest activity.
            Conversation.objects.filter(pk=conversation.pk).update(updated_at=timezone.now())
        asked, answer = Message.objects.bulk_create(
            [
                Message(conversation=conversation, role=Message.Role.USER, text=question),
                Message(
                    conversation=conversation,
                    role=Message.Role.ASSISTANT,
                    status=Message.Status.STREAMING,
                    model=model,
                    k=k,
                    collection_id=collection_id,
                    claimed_at=timezone.now() if claimed else None,
                ),
            ]
        )
    return asked, answer


def saver_for(answer: Message) -> SaveAnswer:
    """``save`` for ``generate`` that fills in an answer made by ``open_turn``."""

    async def save(outcome: Outcome) -> Message:
        _fill(answer, outcome)
        return await _fills.submit(answer)

    return save


#: The columns a finished answer fills in.
_FILLED = (
    "text", "status", "error", "sources", "model", "retrieval_ms", "ttft_ms", "total_ms", "tokens",
    "tokens_per_s", "gap_p50_ms", "gap_p95_ms", "gap_max_ms", "finish_reason", "updated_at",
)  # fmt: skip
_FILL_SQL = (
    f"UPDATE {Message._meta.db_table} SET "
    + ", ".join(f"{column} = %s" + ("::jsonb" if column == "sources" else "") for column in _FILLED)
    + " WHERE id = %s"
)


@sync_to_async(thread_sensitive=False)  # a batch belongs to no request
def _save_fills(answers: list[Message]) -> list[Message]:
    # One statement per answer, sent in one pipeline by executemany: Django's bulk_update
    # builds a CASE per column and answer, which cost 2.5 ms of CPU per answer at c=100
    # (0.5 s per 200 answers, docs/benchmarks.md) on the thread the event loop competes with.
    now = timezone.now()
    rows = []
    for answer in answers:
        answer.updated_at = now
        values = [getattr(answer, column) for column in _FILLED]
        values[_FILLED.index("sources")] = json.dumps(answer.sources, ensure_ascii=False)
        rows.append([*values, answer.pk])
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.executemany(_FILL_SQL, rows)
    finally:
        release_connection()
    return answers


# Answers that end together are saved together: one UPDATE for a burst instead of one
# statement and one thread hop each (the c=100 benchmark: docs/benchmarks.md). A failed
# batch is retried answer by answer, and an answer whose client has gone is saved all
# the same.
_fills: Batcher[Message, Message] = Batcher(_save_fills, max_size=100, split=lambda exc: True, keep_abandoned=True)


async def open_new_turn(
    *,
    question: str,
    user_id: int | None,
    session_key: str = "",
    model: str,
    k: int,
    collection_id: int | None = None,
) -> Message:
    """``open_turn`` for a question that starts a conversation, its answer claimed by the
    caller: the questions of a burst share one transaction (/rag/stream's and the chat's;
    at c=100 that is one statement of each kind instead of four round trips per question).

    The caller must not hold a pooled connection while it waits (``arelease_connection``):
    a request that kept its session's connection meanwhile starved the pool (tried: 24
    chat visitors at once, a pool of 20, and the POSTs failed)."""
    return await _opens.submit(
        _Open(
            question=question,
            user_id=user_id,
            session_key="" if user_id is not None else session_key,
            model=model,
            k=k,
            collection_id=collection_id,
        )
    )


@dataclass(frozen=True, slots=True)
class _Open:
    question: str
    user_id: int | None
    session_key: str
    model: str
    k: int
    collection_id: int | None


@sync_to_async(thread_sensitive=False)  # a batch belongs to no request
def _open_turns(opens: list[_Open]) -> list[Message]:
    now = timezone.now()
    try:
        with transaction.atomic():
            conversations = Conversation.objects.bulk_create(
                [Conversation(user_id=o.user_id, session_key=o.session_key, title=_title(o.question)) for o in opens]
            )
            messages: list[Message] = []
            for o, conversation in zip(opens, conversations, strict=True):
                messages += [
                    Message(conversation=conversation, role=Message.Role.USER, text=o.question),
                    Message(
                        conversation=conversation,
                        role=Message.Role.ASSISTANT,
                        status=Message.Status.STREAMING,
                        model=o.model,
                        k=o.k,
                        collection_id=o.collection_id,
                        claimed_at=now,
                    ),
                ]
            Message.objects.bulk_create(messages)
    finally:
        release_connection()
    return messages[1::2]


_opens: Batcher[_Open, Message] = Batcher(_open_turns, max_size=100, split=lambda exc: True)


@dataclass(frozen=True, slots=True)
class _Turn:
    question: str
    conversation: Conversation | None
    user_id: int | None
    session_key: str
    outcome: Outcome


@sync_to_async(thread_sensitive=False)  # a batch outlives the request that started it
def _save_turns(turns: list[_Turn]) -> list[Message]:
    """Questions with their answers, in one transaction (conversations made as needed)."""
    try:
        with transaction.atomic():
            new = {i: _conversation_for(t) for i, t in enumerate(turns) if t.conversation is None}
            Conversation.objects.bulk_create(new.values())
            messages: list[Message] = []
            for i, turn in enumerate(turns):
                conversation = new.get(i) or turn.conversation
                answer = Message(conversation=conversation, role=Message.Role.ASSISTANT)
                _fill(answer, turn.outcome)
                messages += [Message(conversation=conversation, role=Message.Role.USER, text=turn.question), answer]
            Message.objects.bulk_create(messages)
    finally:
        release_connection()
    return messages[1::2]


# Answers that end together (a burst of questions finishing) are saved together:
# one thread hop and three statements instead of one hop and three statements
# each, on the event loop's time while later questions wait for a first token.
# A failed batch is retried turn by turn, so one bad row loses only itself; a
# turn whose client has gone is saved all the same.
_turns: Batcher[_Turn, Message] = Batcher(_save_turns, max_size=100, split=lambda exc: True, keep_abandoned=True)


def _new_conversation(question: str, *, user_id: int | None, session_key: str) -> Conversation:
    return Conversation.objects.create(user_id=user_id, session_key=session_key, title=_title(question))


def _conversation_for(turn: _Turn) -> Conversation:
    return Conversation(user_id=turn.user_id, session_key=turn.session_key, title=_title(turn.question))


def _title(question: str) -> str:
    return " ".join(question.split())[:200]


def _fill(answer: Message, outcome: Outcome) -> None:
    answer.text = storable(outcome.text)
    answer.status = outcome.status
    answer.error = storable(outcome.error.message) if outcome.error else ""
    answer.sources = [s.public() for s in outcome.sources]
    answer.model = outcome.model
    answer.retrieval_ms = rounded(outcome.retrieval_ms)
    answer.ttft_ms = rounded(outcome.ttft_ms)
    answer.total_ms = round(outcome.total_ms, 2)
    answer.tokens = outcome.tokens
    answer.tokens_per_s = rounded(outcome.gaps.tokens_per_s)
    answer.gap_p50_ms = rounded(outcome.gaps.p50_ms)
    answer.gap_p95_ms = rounded(outcome.gaps.p95_ms)
    answer.gap_max_ms = rounded(outcome.gaps.max_ms)
    answer.finish_reason = outcome.finish_reason


def rounded(value: float | None) -> float | None:
    """A timing or a rate as it is stored and sent: two decimals."""
    return round(value, 2) if value is not None else None
