"""Conversations: asking, generating each answer once, following it, stopping, feedback.

The chat page (SSE) and the WebSocket consumer are thin transports over this
module. A turn has two steps so that the answer has an id before it streams:

1. ``ask`` saves the question and its answer (status ``streaming``), the answer already
   claimed by this process, and starts its generation in a task (rag.answers.live): the
   LLM is already working while the client opens the answer's stream.
2. ``stream_turn`` returns the answer's events (rag.answers.follow): a first stream,
   a reconnect, a reload or a second tab gets the events after the last one it saw,
   live, from any process. (An answer nobody started is claimed and started by its first
   stream.)

The generation belongs to no request: closing the tab does not stop it. ``stop`` does,
from any process (a NOTIFY reaches the one generating), and so does the LLM timeout.

Every lookup is filtered by the owner (rag.answers.access: the user, or an anonymous
visitor's key), so a conversation or answer of someone else is indistinguishable from a missing one.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.utils import timezone

from rag.answers import generate, live
from rag.answers.access import Owner
from rag.answers.events import LogEvent, seq_after
from rag.answers.follow import follow
from rag.models import Conversation, Feedback, Message, Reader
from rag.providers import ChatProvider, EmbeddingProvider, chat_provider
from rag.services import answer_rows
from rag.services.connections import release_connection
from rag.services.history import condense, turns_before
from rag.services.retrieval import CollectionScope


class NotFound(LookupError):
    """No such conversation or answer for this owner (it may belong to someone else)."""


@dataclass(frozen=True, slots=True)
class Turn:
    question: Message
    answer: Message | None


# --- reading --------------------------------------------------------------------------------------


async def list_conversations(*, owner: Owner, limit: int = 50) -> list[Conversation]:
    return [c async for c in Conversation.objects.filter(owner.conversations()).order_by("-updated_at")[:limit]]


async def get_conversation(*, owner: Owner, conversation_id: uuid.UUID) -> Conversation:
    try:
        return await Conversation.objects.filter(owner.conversations()).aget(pk=conversation_id)
    except Conversation.DoesNotExist:
        raise NotFound(f"No conversation {conversation_id}.") from None


REVOKED = "This answer quoted a collection you can no longer read, so it is not shown."


async def get_turns(
    *, owner: Owner, conversation_id: uuid.UUID, reader: Reader | None = None
) -> tuple[Conversation, list[Turn]]:
    """The conversation's turns; an answer quoting a collection ``reader`` may no longer read
    (removed from its group since) is shown as REVOKED, without its text and sources."""
    conversation = await get_conversation(owner=owner, conversation_id=conversation_id)
    revoked = await _revoked(reader, conversation.messages.all())
    turns: list[Turn] = []
    async for message in conversation.messages.select_related("feedback").order_by("id"):
        if message.role == Message.Role.USER:
            turns.append(Turn(question=message, answer=None))
        elif turns and turns[-1].answer is None:
            turns[-1] = Turn(question=turns[-1].question, answer=_shown(message, revoked))
    return conversation, turns


async def get_answer(*, owner: Owner, answer_id: int, reader: Reader | None = None) -> Message:
    """The owner's answer, REVOKED if it quotes a collection ``reader`` may no longer read."""
    try:
        answer = await _answers(owner).aget(pk=answer_id)
    except Message.DoesNotExist:
        raise NotFound(f"No answer {answer_id}.") from None
    return _shown(answer, await _revoked(reader, Message.objects.filter(pk=answer.pk)))


async def _revoked(reader: Reader | None, messages: QuerySet[Message]) -> set[int]:
    if reader is None:
        return set()
    return {pk async for pk in messages.citing_unreadable(reader).values_list("pk", flat=True)}


def _shown(answer: Message, revoked: set[int]) -> Message:
    if answer.pk in revoked:
        answer.text, answer.sources, answer.error = REVOKED, [], ""
    return answer


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
    start: bool = True,
    chat: ChatProvider | None = None,
    embedder: EmbeddingProvider | None = None,
    collections: CollectionScope = None,
) -> Message:
    """Save ``question`` (in a new conversation unless one is given) and its answer, and start
    generating the answer in this process: the LLM is at work while the client opens the
    answer's stream. ``start=False`` leaves that to the answer's first stream.

    ``collection_id`` narrows the search to one collection, within ``collections`` (the
    transports pass what the asking user may read), so naming another one finds nothing.
    """
    if owner.user_id is None and not owner.session_key:
        raise ValueError("An anonymous owner needs a key (Owner.session_key).")
    model = (chat or chat_provider()).model
    if conversation_id is None and start:
        answer = await answer_rows.open_new_turn(
            question=question,
            user_id=owner.user_id,
            session_key=owner.session_key,
            model=model,
            k=k,
            collection_id=collection_id,
        )
        claimed = _Claimed(answer=answer, question=question, history=[])
    else:
        claimed = await _open(
            owner=owner,
            question=question,
            k=k,
            conversation_id=conversation_id,
            collection_id=collection_id,
            model=model,
            claim=start,
            reader=_whole(collections),
        )
    await _generate(claimed, owner=owner, chat=chat, embedder=embedder, collections=collections)
    return claimed.answer


async def regenerate(*, owner: Owner, answer_id: int, collections: CollectionScope = None) -> Message:
    """Ask the question of ``answer_id`` again, as a new turn of the same conversation."""
    answer = await get_answer(owner=owner, answer_id=answer_id)
    question = await _question_of(answer)
    return await ask(
        owner=owner,
        question=question.text,
        k=answer.k or settings.RAG_DEFAULT_K,
        conversation_id=answer.conversation_id,
        collection_id=answer.collection_id,
        collections=collections,
    )


async def stream_turn(
    *,
    owner: Owner,
    answer_id: int,
    after: int = 0,
    last_event_id: str | None = None,
    chat: ChatProvider | None = None,
    embedder: EmbeddingProvider | None = None,
    collections: CollectionScope = None,
) -> AsyncIterator[LogEvent]:
    """The events of one answer after sequence number ``after`` (or after the event
    ``last_event_id``), to its end; generated here if nobody has begun it (``ask`` begins it).

    Retrieval searches only ``collections`` (the transports pass what the asking user may
    read). Raises ``NotFound`` (before the first event) for an answer the owner may not see.
    """
    running = live.get(answer_id)
    if running is not None and running.asker == owner:
        # Asked by this owner in this process (the usual stream right after its POST): no
        # query to check who is reading (5% of the chat's CPU at c=100).
        claimed, key = None, running.key
    else:
        claimed = await _claim(owner=owner, answer_id=answer_id, reader=_whole(collections))
        key = str(claimed.answer.public_id)
    if last_event_id is not None:
        after = seq_after(last_event_id, key=key)
    if claimed is not None:
        await _generate(claimed, owner=owner, chat=chat, embedder=embedder, collections=collections)
    return follow(answer_id, key=key, after=after)


async def _generate(
    claimed: _Claimed,
    *,
    owner: Owner,
    chat: ChatProvider | None,
    embedder: EmbeddingProvider | None,
    collections: CollectionScope,
) -> None:
    """Start the generation of an answer this caller claimed (a follower's claim is empty)."""
    if claimed.question is None:
        return
    # The generation fills in its own copy as it ends: the caller's answer stays as it was
    # asked, so that the page it renders subscribes to the stream, however fast the LLM.
    answer = _copy(claimed.answer)
    if answer.collection_id is not None:
        collections = _narrow(collections, answer.collection_id)
    await generate.start(
        answer,
        prepare=lambda: _prompt(claimed, chat=chat),
        chat=chat,
        embedder=embedder,
        collections=collections,
        asker=owner,
    )


async def find_answer(*, owner: Owner, key: str) -> Message:
    """The owner's answer whose public id is ``key``."""
    try:
        return await _answers(owner).aget(public_id=key)
    except (Message.DoesNotExist, ValidationError):
        raise NotFound(f"No answer {key}.") from None


def _whole(collections: CollectionScope) -> Reader | None:
    """The reader behind a search scope, not narrowed to one collection: what decides which
    earlier answers may go back into a prompt. None for a scope that is not a person's."""
    return collections.only() if isinstance(collections, Reader) else None


def _copy(message: Message) -> Message:
    fields = [f.attname for f in Message._meta.concrete_fields]
    return Message.from_db(message._state.db, fields, [getattr(message, name) for name in fields])


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
    """Stop an answer wherever it is generated: its upstream LLM request closes and the
    partial text is kept as ``stopped``. False when it had already ended."""
    return await generate.stop(await get_answer(owner=owner, answer_id=answer_id))


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
    return await sync_to_async(lambda: turns_before(answer.conversation_id, _question(answer).pk, budget_tokens))()


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


@dataclass(frozen=True, slots=True)
class _Claimed:
    answer: Message
    #: What the answer is generated from, for the caller that claimed it; None for a follower.
    question: str | None = None
    history: list[dict[str, str]] | None = None


@sync_to_async
def _claim(*, owner: Owner, answer_id: int, reader: Reader | None = None) -> _Claimed:
    """The owner's answer, claimed by this caller if nobody has: one trip to the request's
    thread for the lookup, the claim, the question and the history (every chat question
    pays it before its first token; on the shared pool of six threads instead, those of
    100 answers at once queued there)."""
    try:
        # No select_related: a stream needs the answer's own columns only.
        answer = Message.objects.filter(owner.messages(), role=Message.Role.ASSISTANT).get(pk=answer_id)
    except Message.DoesNotExist:
        release_connection()
        raise NotFound(f"No answer {answer_id}.") from None
    return _claim_sync(answer, reader)


def _claim_sync(answer: Message, reader: Reader | None = None) -> _Claimed:
    """``answer`` claimed by this caller (one conditional UPDATE), with what it is generated
    from; a follower's claim (someone else's, or an answer that ended) carries neither."""
    try:
        if answer.claimed_at is not None or answer.status != Message.Status.STREAMING:
            return _Claimed(answer=answer)
        now = timezone.now()
        unclaimed = Message.objects.filter(pk=answer.pk, status=Message.Status.STREAMING, claimed_at__isnull=True)
        if not unclaimed.update(claimed_at=now):
            return _Claimed(answer=answer)
        answer.claimed_at = now  # the final save writes the whole row; keep the claim in it
        question = _question(answer)
        history = turns_before(answer.conversation_id, question.pk, settings.RAG_HISTORY_TOKENS, reader)
        return _Claimed(answer=answer, question=question.text, history=history)
    finally:
        # The request's thread is done with the database until the answer ends: the
        # generation has its own, and a follower here reads memory or borrows one per read.
        release_connection()


@sync_to_async
def _open(
    *,
    owner: Owner,
    question: str,
    k: int,
    conversation_id: uuid.UUID | None,
    collection_id: int | None,
    model: str,
    claim: bool,
    reader: Reader | None,
) -> _Claimed:
    """``ask``'s trip to the database for a follow-up (or an answer left to its stream): the
    owner's conversation, what was said in it, and the new turn, its answer claimed by this
    caller when ``claim``: one trip to the request's thread instead of four."""
    try:
        conversation, history = None, []
        if conversation_id is not None:
            try:
                conversation = Conversation.objects.filter(owner.conversations()).get(pk=conversation_id)
            except Conversation.DoesNotExist:
                raise NotFound(f"No conversation {conversation_id}.") from None
            if claim:
                history = turns_before(conversation.pk, None, settings.RAG_HISTORY_TOKENS, reader)
        asked, answer = answer_rows.open_turn(
            question=question,
            conversation=conversation,
            user_id=owner.user_id,
            session_key="" if owner.user_id is not None else owner.session_key,
            model=model,
            k=k,
            collection_id=collection_id,
            claimed=claim,
        )
        return _Claimed(answer=answer, question=asked.text if claim else None, history=history)
    finally:
        release_connection()


async def _prompt(claimed: _Claimed, *, chat: ChatProvider | None) -> generate.Prompt:
    """What the answer is generated from: the question, the conversation so far, and the
    question condensed with it for the search (a short call to the LLM, in the generation)."""
    question, history = claimed.question, claimed.history or []
    search_query = await condense(question=question, history=history, chat=chat or chat_provider())
    return generate.Prompt(question=question, search_query=search_query, history=history)
