"""Conversations: asking, streaming one answer exactly once, stopping, feedback.

The chat page (SSE) and the WebSocket consumer are thin transports over this
module. A turn has two steps so that the answer has an id before it streams:

1. ``ask`` saves the question and a placeholder answer (status ``streaming``).
2. ``stream_turn`` generates that answer. The first caller claims it in the
   database (one conditional UPDATE); any later caller for the same answer (an
   EventSource reconnecting, a second tab) never generates: it waits for the
   answer to leave ``streaming`` and replays what was stored. The generating
   stream renews its claim as it goes; a claim left to go stale by a process
   that died is turned into an ``interrupted`` error, so nobody waits forever.

``stop`` cancels a generation running in *this* process: the registry of
running answers is in memory. The documented deployment runs one server
process per host behind a proxy with sticky routing, or a single process; a
deployment that spreads one user's requests over several processes would need
the stop request to travel (a database flag polled between tokens, or Postgres
LISTEN/NOTIFY).

Every lookup is filtered by the owner (the user, or the anonymous session), so a
conversation or answer of someone else is indistinguishable from a missing one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import Q, QuerySet
from django.utils import timezone

from rag.models import Conversation, Feedback, Message, Reader, storable
from rag.providers import ChatProvider, EmbeddingProvider, ProviderError, chat_provider
from rag.providers.base import estimate_tokens
from rag.services import answering
from rag.services.connections import arelease_connection, release_connection
from rag.services.retrieval import CollectionScope, Source

logger = logging.getLogger(__name__)

#: How long a second stream for an answer waits for the first one to finish.
REPLAY_WAIT_S = 300.0
REPLAY_POLL_S = 0.25
#: A generating stream renews its claim (and saves the text so far) this often,
#: so that a claim left by a process that died is seen to be dead...
CLAIM_RENEW_S = 10.0
#: ...once it is this old: the answer is then marked interrupted, keeping its text.
CLAIM_STALE_S = 3 * CLAIM_RENEW_S

CONDENSE_PROMPT = (
    "Rewrite the user's last question as one standalone search query that can be understood "
    "without the conversation. Reply with the query only, no explanation."
)
CONDENSE_MAX_TOKENS = 64


class NotFound(LookupError):
    """No such conversation or answer for this owner (it may belong to someone else)."""


@dataclass(frozen=True, slots=True)
class Owner:
    """Who a conversation belongs to: a signed-in user, else an anonymous session."""

    user_id: int | None
    session_key: str = ""

    def conversations(self) -> Q:
        if self.user_id is not None:
            return Q(user_id=self.user_id)
        if not self.session_key:
            return Q(pk__in=[])  # an anonymous visitor without a session owns nothing
        return Q(user__isnull=True, session_key=self.session_key)

    def messages(self) -> Q:
        if self.user_id is not None:
            return Q(conversation__user_id=self.user_id)
        if not self.session_key:
            return Q(pk__in=[])
        return Q(conversation__user__isnull=True, conversation__session_key=self.session_key)


@dataclass(frozen=True, slots=True)
class Started:
    """The generation began: which answer, in which conversation."""

    answer_id: int
    conversation_id: str


@dataclass(frozen=True, slots=True)
class Done:
    """The answer as stored, once it has left ``streaming``: always the last event."""

    answer: Message


ChatEvent = Started | answering.AnswerEvent | Done


@dataclass(frozen=True, slots=True)
class Turn:
    question: Message
    answer: Message | None


# answer id -> the task iterating its generation, in this process.
_running: dict[int, asyncio.Task] = {}
# answers whose generation was cancelled by ``stop`` (not by a departing client).
_stopping: set[int] = set()


# --- reading --------------------------------------------------------------------------------------


async def list_conversations(*, owner: Owner, limit: int = 50) -> list[Conversation]:
    return [c async for c in Conversation.objects.filter(owner.conversations()).order_by("-updated_at")[:limit]]


async def get_conversation(*, owner: Owner, conversation_id: uuid.UUID) -> Conversation:
    try:
        return await Conversation.objects.filter(owner.conversations()).aget(pk=conversation_id)
    except Conversation.DoesNotExist:
        raise NotFound(f"No conversation {conversation_id}.") from None


async def get_turns(*, owner: Owner, conversation_id: uuid.UUID) -> tuple[Conversation, list[Turn]]:
    conversation = await get_conversation(owner=owner, conversation_id=conversation_id)
    turns: list[Turn] = []
    async for message in conversation.messages.select_related("feedback").order_by("id"):
        if message.role == Message.Role.USER:
            turns.append(Turn(question=message, answer=None))
        elif turns and turns[-1].answer is None:
            turns[-1] = Turn(question=turns[-1].question, answer=message)
    return conversation, turns


async def get_answer(*, owner: Owner, answer_id: int) -> Message:
    try:
        return await _answers(owner).aget(pk=answer_id)
    except Message.DoesNotExist:
        raise NotFound(f"No answer {answer_id}.") from None


def _answers(owner: Owner) -> QuerySet[Message]:
    answers = Message.objects.filter(owner.messages(), role=Message.Role.ASSISTANT)
    return answers.select_related("conversation", "feedback")


async def get_turn(*, owner: Owner, answer_id: int) -> Turn:
    answer = await get_answer(owner=owner, answer_id=answer_id)
    return Turn(question=await _question_of(answer), answer=answer)


# --- asking ---------------------------------------------------------------------------------------


async def ask(
    *,
    owner: Owner,
    question: str,
    k: int,
    conversation_id: uuid.UUID | None = None,
    collection_id: int | None = None,
) -> Message:
    """Save ``question`` (in a new conversation unless one is given) and its placeholder answer.

    ``collection_id`` narrows the search to one collection; the stream still
    searches only what the asking user may read, so naming another one finds nothing.
    """
    if owner.user_id is None and not owner.session_key:
        raise ValueError("An anonymous owner needs a session key.")
    conversation = None
    if conversation_id is not None:
        conversation = await get_conversation(owner=owner, conversation_id=conversation_id)
    return await answering.open_turn(
        question=question,
        conversation=conversation,
        user_id=owner.user_id,
        session_key="" if owner.user_id is not None else owner.session_key,
        model=chat_provider().model,
        k=k,
        collection_id=collection_id,
    )


async def regenerate(*, owner: Owner, answer_id: int) -> Message:
    """Ask the question of ``answer_id`` again, as a new turn of the same conversation."""
    answer = await get_answer(owner=owner, answer_id=answer_id)
    question = await _question_of(answer)
    return await ask(
        owner=owner,
        question=question.text,
        k=answer.k or settings.RAG_DEFAULT_K,
        conversation_id=answer.conversation_id,
        collection_id=answer.collection_id,
    )


async def stream_turn(
    *,
    owner: Owner,
    answer_id: int,
    chat: ChatProvider | None = None,
    embedder: EmbeddingProvider | None = None,
    collections: CollectionScope = None,
) -> AsyncIterator[ChatEvent]:
    """The events of one answer: generated by the first caller, replayed for any other.

    Retrieval searches only ``collections`` (the transports pass what the asking user may
    read). Raises ``NotFound`` (before the first event) for an answer the owner may not see.
    """
    answer, claimed = await _claim(owner=owner, answer_id=answer_id)
    if not claimed:
        return _replay(answer.pk)
    if answer.collection_id is not None:
        collections = _narrow(collections, answer.collection_id)
    return _generate(answer, chat=chat, embedder=embedder, collections=collections)


def _narrow(collections: CollectionScope, collection_id: int) -> CollectionScope:
    """The chosen collection, within what the caller may read."""
    if collections is None:
        return [collection_id]
    if isinstance(collections, Reader):
        return collections.only(collection_id=collection_id)
    if isinstance(collections, QuerySet):
        return collections.filter(pk=collection_id)
    return [pk for pk in collections if pk == collection_id]


def adopt_anonymous(*, session_key: str, user_id: int) -> int:
    """Give the conversations asked anonymously under ``session_key`` to a user who just
    signed in (sync: login runs it); how many moved."""
    return Conversation.objects.filter(user__isnull=True, session_key=session_key).update(user_id=user_id)


async def stop(*, owner: Owner, answer_id: int) -> bool:
    """Stop an answer: cancel its generation (closing the upstream LLM request) and keep
    the partial text as ``stopped``. False when it had already ended, or is generating in
    another process."""
    answer = await get_answer(owner=owner, answer_id=answer_id)
    task = _running.get(answer.pk)
    if task is not None and not task.done():
        if answer.pk not in _stopping:
            _stopping.add(answer.pk)
            task.cancel()
        return True
    # Stopped before any stream claimed it: it must never start.
    unclaimed = await Message.objects.filter(
        pk=answer.pk, status=Message.Status.STREAMING, claimed_at__isnull=True
    ).aupdate(status=Message.Status.STOPPED, finish_reason="stopped", claimed_at=timezone.now())
    return bool(unclaimed)


async def give_feedback(*, owner: Owner, answer_id: int, value: str) -> Feedback:
    if value not in Feedback.Value.values:
        raise ValueError(f"Feedback must be one of {', '.join(Feedback.Value.values)}, not {value!r}.")
    answer = await get_answer(owner=owner, answer_id=answer_id)
    chunk_ids = [s["id"] for s in answer.sources if isinstance(s, dict) and "id" in s]
    feedback, _created = await Feedback.objects.aupdate_or_create(
        message=answer, defaults={"value": value, "chunk_ids": chunk_ids}
    )
    return feedback


# --- history --------------------------------------------------------------------------------------


async def build_history(*, answer: Message, budget_tokens: int) -> list[dict[str, str]]:
    """The complete turns before ``answer``, as chat messages, newest kept first within the
    token budget, returned oldest first."""
    return await sync_to_async(lambda: _history(answer, _question(answer), budget_tokens))()


def _history(answer: Message, question: Message, budget_tokens: int) -> list[dict[str, str]]:
    earlier = Message.objects.filter(conversation_id=answer.conversation_id, pk__lt=question.pk).order_by("-id")
    history: list[dict[str, str]] = []
    used = 0
    pending_answer: Message | None = None
    for message in earlier:  # newest first
        if message.role == Message.Role.ASSISTANT:
            pending_answer = message
            continue
        reply, pending_answer = pending_answer, None
        if reply is None or reply.status != Message.Status.COMPLETE or not reply.text:
            continue  # a question without a usable answer teaches the model nothing
        cost = estimate_tokens(message.text) + estimate_tokens(reply.text)
        if used + cost > budget_tokens:
            break
        used += cost
        history[:0] = [{"role": "user", "content": message.text}, {"role": "assistant", "content": reply.text}]
    return history


async def condense(*, question: str, history: list[dict[str, str]], chat: ChatProvider) -> str:
    """A standalone search query for a follow-up question; the question itself on failure."""
    if not history:
        return question
    transcript = "\n".join(f"{m['role']}: {m['content']}" for m in history)
    messages = [
        {"role": "system", "content": CONDENSE_PROMPT},
        {"role": "user", "content": f"Conversation:\n{transcript}\n\nLast question: {question}"},
    ]
    try:
        query = await chat.complete(messages, max_tokens=CONDENSE_MAX_TOKENS, temperature=0.0)
    except ProviderError as exc:
        # Retrieval on the raw question is worse but still useful; the answer
        # itself will report the provider failure if it persists.
        logger.warning("Condensing a follow-up failed (%s); searching with the question as asked", exc.code)
        return question
    query = " ".join(query.split())
    return query[: settings.RAG_MAX_QUESTION_CHARS] or question


# --- internals ------------------------------------------------------------------------------------


async def _question_of(answer: Message) -> Message:
    return await sync_to_async(_question)(answer)


def _question(answer: Message) -> Message:
    question = (
        Message.objects.filter(conversation_id=answer.conversation_id, role=Message.Role.USER, pk__lt=answer.pk)
        .order_by("-id")
        .first()
    )
    if question is None:
        raise NotFound(f"Answer {answer.pk} has no question.")
    return question


@sync_to_async
def _claim(*, owner: Owner, answer_id: int) -> tuple[Message, bool]:
    """The answer, and whether this caller claimed it (one conditional UPDATE): one trip to
    the thread for both, since every chat question pays it before its first token."""
    try:
        answer = _answers(owner).get(pk=answer_id)
    except Message.DoesNotExist:
        raise NotFound(f"No answer {answer_id}.") from None
    now = timezone.now()
    claimed = Message.objects.filter(pk=answer.pk, status=Message.Status.STREAMING, claimed_at__isnull=True).update(
        claimed_at=now
    )
    if claimed:
        answer.claimed_at = now  # the final save writes the whole row; keep the claim in it
    return answer, bool(claimed)


@sync_to_async
def _prepare(answer: Message) -> tuple[Message, list[dict[str, str]]]:
    """The question and the conversation so far, in one trip to the thread, whose database
    connection then goes back to the pool: the LLM may take a while."""
    try:
        question = _question(answer)
        return question, _history(answer, question, settings.RAG_HISTORY_TOKENS)
    finally:
        release_connection()


async def _generate(
    answer: Message, *, chat: ChatProvider | None, embedder: EmbeddingProvider | None, collections: CollectionScope
) -> AsyncIterator[ChatEvent]:
    # The task that iterates this generator is the one ``stop`` cancels: the SSE
    # pump or the WebSocket consumer's task, whichever transport runs it.
    task = asyncio.current_task()
    assert task is not None
    _running[answer.pk] = task
    save = answering.saver_for(answer)
    saved = False

    async def save_once(outcome: answering.Outcome) -> Message:
        nonlocal saved
        message = await save(outcome)
        saved = True
        return message

    started = time.perf_counter()
    chat = chat or chat_provider()
    try:
        yield Started(answer_id=answer.pk, conversation_id=str(answer.conversation_id))
        question, history = await _prepare(answer)
        search_query = await condense(question=question.text, history=history, chat=chat)
        events = answering.generate(
            question=question.text,
            k=answer.k or settings.RAG_DEFAULT_K,
            save=save_once,
            chat=chat,
            embedder=embedder,
            search_query=search_query,
            history=history,
            collections=collections,
        )
        renewed = time.monotonic()
        parts: list[str] = []
        async with aclosing(events):
            async for event in events:
                if isinstance(event, answering.Token):
                    parts.append(event.text)
                    if time.monotonic() - renewed > CLAIM_RENEW_S:
                        renewed = time.monotonic()
                        await _renew_claim(answer, text="".join(parts))
                yield event
    except asyncio.CancelledError:
        if answer.pk not in _stopping:
            raise  # the client left: generate has saved the partial answer as stopped
        # Stopped on request: the stream carries on to tell its client how it ended.
        task.uncancel()
        if not saved:
            await save_once(_stopped_before_generation(answer, chat=chat, started=started))
        yield metrics_of(answer)
    finally:
        _running.pop(answer.pk, None)
        _stopping.discard(answer.pk)
        if not saved:
            # Cancelled or failed before generate took over: never leave the
            # answer claimed but streaming forever.
            await save_once(_stopped_before_generation(answer, chat=chat, started=started))
    yield Done(answer=answer)


def _stopped_before_generation(answer: Message, *, chat: ChatProvider, started: float) -> answering.Outcome:
    return answering.Outcome(
        status=Message.Status.STOPPED,
        model=chat.model,
        total_ms=(time.perf_counter() - started) * 1000,
        finish_reason="stopped",
        sources=[],
    )


@sync_to_async
def _renew_claim(answer: Message, *, text: str) -> None:
    """Still generating: a fresh claim, and the text so far in case this process dies."""
    Message.objects.filter(pk=answer.pk, status=Message.Status.STREAMING).update(
        claimed_at=timezone.now(), text=storable(text)
    )
    release_connection()  # the answer goes on streaming


async def _interrupt_if_abandoned(answer: Message) -> bool:
    """Mark an answer whose claim went stale (its process died) as interrupted; True if so."""
    if answer.claimed_at is None or timezone.now() - answer.claimed_at < dt.timedelta(seconds=CLAIM_STALE_S):
        return False
    return bool(
        await Message.objects.filter(
            pk=answer.pk, status=Message.Status.STREAMING, claimed_at=answer.claimed_at
        ).aupdate(
            status=Message.Status.ERROR,
            finish_reason="interrupted",
            error="This answer was interrupted: the server stopped while writing it. Regenerate it to try again.",
        )
    )


async def _replay(answer_id: int) -> AsyncIterator[ChatEvent]:
    """What a stream shows for an answer another stream generates or generated."""
    deadline = time.monotonic() + REPLAY_WAIT_S
    while True:
        answer = await Message.objects.aget(pk=answer_id)
        if answer.status != Message.Status.STREAMING:
            break
        if await _interrupt_if_abandoned(answer):
            continue  # read it back as it is now: an error, with the text saved so far
        if time.monotonic() > deadline:
            yield answering.Error(
                message="This answer is still being written in another window or tab. Reload the page later.",
                code="busy",
                message_id=answer_id,
            )
            yield Done(answer=answer)
            return
        # Polling with a deadline: the generating stream may live in another process.
        await arelease_connection()  # not held while waiting
        await asyncio.sleep(REPLAY_POLL_S)
    yield Started(answer_id=answer.pk, conversation_id=str(answer.conversation_id))
    if answer.sources:
        yield answering.Sources([Source.from_public(s, n) for n, s in enumerate(answer.sources, start=1)])
    if answer.text:
        yield answering.Token(answer.text)
    if answer.status == Message.Status.ERROR:
        yield answering.Error(message=answer.error, code="error", message_id=answer.pk)
    else:
        yield metrics_of(answer)
    yield Done(answer=answer)


def metrics_of(answer: Message) -> answering.Metrics:
    """The metrics event of a stored answer, rounded as the live one is."""
    rounded = answering.rounded
    return answering.Metrics(
        message_id=answer.pk,
        conversation_id=str(answer.conversation_id),
        status=answer.status,
        model=answer.model,
        embedding_model="",  # not stored with the answer
        retrieval_ms=rounded(answer.retrieval_ms),
        ttft_ms=rounded(answer.ttft_ms),
        total_ms=rounded(answer.total_ms) or 0.0,
        tokens=answer.tokens or 0,
        tokens_per_s=rounded(answer.tokens_per_s),
        gap_p50_ms=rounded(answer.gap_p50_ms),
        gap_p95_ms=rounded(answer.gap_p95_ms),
        gap_max_ms=rounded(answer.gap_max_ms),
        finish_reason=answer.finish_reason,
    )
