"""An answer's rows: made up front (one by one, or a burst's in one transaction) and filled
in as the answer ends, in batches.

A transport that needs the answer's id before it streams makes its rows first
(``open_turn``; ``open_new_turn`` for a question that starts a conversation, batched);
``saver_for`` gives ``answering.generate`` the ``save`` that fills the answer in. A
one-shot question read directly is stored with its answer when it ends (``save_turn``).
Answers that end together are saved together: one statement for a burst instead of one
statement and one thread hop each (the c=100 benchmark: docs/benchmarks.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from asgiref.sync import sync_to_async
from django.db import connection, transaction
from django.utils import timezone

from rag.batching import Batcher
from rag.models import Conversation, Message, storable
from rag.services.connections import UNREACHABLE_ERRORS, release_connection

if TYPE_CHECKING:
    from rag.services.answering import Outcome, SaveAnswer


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
            conversation = _conversation(question, user_id=user_id, session_key=session_key)
            conversation.save()
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


def _retry_row_by_row(exc: BaseException) -> bool:
    """Whether to retry a failed batch row by row. Not when the database could not be
    reached: each row would fail alike, one pool timeout after another."""
    return not isinstance(exc, UNREACHABLE_ERRORS)


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
    rows.sort(key=lambda row: row[-1])  # locked in id order, as store._SOURCES locks: no deadlock
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
_fills: Batcher[Message, Message] = Batcher(_save_fills, max_size=100, split=_retry_row_by_row, keep_abandoned=True)


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
                [_conversation(o.question, user_id=o.user_id, session_key=o.session_key) for o in opens]
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


_opens: Batcher[_Open, Message] = Batcher(_open_turns, max_size=100, split=_retry_row_by_row)


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
            new = {
                i: _conversation(t.question, user_id=t.user_id, session_key=t.session_key)
                for i, t in enumerate(turns)
                if t.conversation is None
            }
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
_turns: Batcher[_Turn, Message] = Batcher(_save_turns, max_size=100, split=_retry_row_by_row, keep_abandoned=True)


def _conversation(question: str, *, user_id: int | None, session_key: str) -> Conversation:
    """A new conversation (not saved yet), titled after its first question."""
    return Conversation(user_id=user_id, session_key=session_key, title=_title(question))


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


async def save_turn(
    *, question: str, conversation: Conversation | None, user_id: int | None, session_key: str, outcome: Outcome
) -> Message:
    """Store a one-shot question with its finished answer (batched with the others ending now)."""
    turn = _Turn(
        question=question, conversation=conversation, user_id=user_id, session_key=session_key, outcome=outcome
    )
    return await _turns.submit(turn)


def rounded(value: float | None) -> float | None:
    """A timing or a rate as it is stored and sent: two decimals."""
    return round(value, 2) if value is not None else None
