"""Replay, then follow live: the one iterator that every chat transport reads.

``follow(answer_id, key=public_id, after=n)`` yields the answer's events after sequence number ``n``
(none twice, none missing) to its ``done`` event, wherever the answer is generated:

- in this process: from memory, as they are made;
- in another process: from Postgres, woken by NOTIFY when new events are stored;
- nowhere any more: an answer that ended is read from its log, completed from its saved
  row when nobody will store the rest (see ``_rest``). A claim not renewed for
  claim_stale_s() belonged to a dead process: the answer is marked interrupted, with its
  text so far, and ends.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress

from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from rag.answers import live, notify, store
from rag.answers.events import DONE, ERROR, METRICS, SOURCES, TOKEN, LogEvent, text_of
from rag.models import Message
from rag.services import answering
from rag.services.connections import release_connection


def claim_stale_s() -> float:
    """A generating process renews its claim every RAG_CLAIM_RENEW_S, tokens or not: a
    claim three times as old belongs to a process that died."""
    return 3 * settings.RAG_CLAIM_RENEW_S


def check_s() -> float:
    """How often a follower with no news checks the claim: a dead process's answer ends
    within claim_stale_s() + check_s() of its last renewal."""
    return settings.RAG_CLAIM_RENEW_S / 2


INTERRUPTED = "This answer was interrupted: the server stopped while writing it. Regenerate it to try again."
#: More events than a dead process can have numbered after its last flush (store.FLUSH_S,
#: a tenth of a second, at a few hundred tokens a second): its interruption is numbered
#: after this gap.
LOST_EVENTS_GAP = 100_000


async def follow(answer_id: int, *, key: str, after: int = 0) -> AsyncIterator[LogEvent]:
    here = live.get(answer_id)
    if here is not None:
        async for event in here.follow(after=after):
            yield event
        return
    listener = await notify.listener()
    wake = listener.follow(answer_id)  # before reading, so that nothing stored meanwhile is missed
    try:
        while True:
            wake.clear()
            events = await store.read_after(answer_id, key, after)
            for event in events:
                yield event
                after = event.seq
                if event.terminal:
                    return
            # Events stored after this read's start are notified, and the wake was cleared
            # before it: while they come, a notification is the only thing to wait for.
            if not events:
                answer = await _answer(answer_id)
                if answer.status != Message.Status.STREAMING:
                    logged = await store.read_after(answer_id, key, 0)
                    if (logged and logged[-1].terminal) or not _storing_its_end(answer):
                        for event in _rest(answer, logged, after=after):
                            yield event
                        return
                elif await _interrupt_if_abandoned(answer):
                    continue
            with suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), check_s())
    finally:
        listener.unfollow(answer_id, wake)


def _storing_its_end(answer: Message) -> bool:
    """Whether an ended answer's process is alive (its claim is fresh), and so stores the
    rest of its log within a flush (store.FLUSH_S). Its followers wait for that rather than
    make an end of their own from the row, which would number the events otherwise than
    the log (the last tokens as one, say) and break a resume from one of them."""
    if answer.claimed_at is None or answer.finish_reason == store.INTERRUPTED:
        return False  # stopped before anyone began it, or its process died
    return not _claim_stale(answer)


def _claim_stale(answer: Message) -> bool:
    """Whether the answer was claimed by a process that has not renewed its claim since
    claim_stale_s(): one that died."""
    return answer.claimed_at is not None and timezone.now() - answer.claimed_at >= dt.timedelta(seconds=claim_stale_s())


def _rest(answer: Message, logged: list[LogEvent], *, after: int) -> Iterator[LogEvent]:
    """What follows ``after`` of an ended answer: from its log when the log is complete;
    else (saved before answers had a log, stopped before it began, or its process died
    after saving it) an end made from the saved row, the same way every time, so that a
    client resuming in the middle of it gets the rest."""
    if logged and logged[-1].terminal:
        yield from (event for event in logged if event.seq > after)
        return
    key = str(answer.public_id)
    text = text_of(logged)
    seq = logged[-1].seq if logged else 0
    rest: list[tuple[str, object]] = []
    if answer.sources and not any(e.kind == SOURCES for e in logged):
        rest.append((SOURCES, answer.sources))
    if answer.text.startswith(text) and len(answer.text) > len(text):
        rest.append((TOKEN, answer.text[len(text) :]))
    if answer.status == Message.Status.ERROR:
        rest.append(
            (ERROR, {"message": answer.error, "code": answer.finish_reason or "error", "message_id": answer.pk})
        )
    else:
        rest.append((METRICS, metrics_of(answer)))
    rest.append((DONE, {"status": answer.status}))
    for kind, data in rest:
        seq += 1
        if kind == ERROR and answer.finish_reason == store.INTERRUPTED:
            # Its process died between two flushes: events it numbered and sent to its own
            # streams may never have been stored, and a client resuming from one of them is
            # ahead of the log. It has seen the text; the end is numbered past any such id.
            seq += LOST_EVENTS_GAP
        if seq > after:
            yield LogEvent(answer.pk, key, seq, kind, data)


def metrics_of(answer: Message) -> dict:
    """The metrics event of a saved answer, rounded as the live one is."""
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
    ).as_dict()


@sync_to_async
def _answer(answer_id: int) -> Message:
    try:
        return Message.objects.get(pk=answer_id)
    finally:
        release_connection()


async def _interrupt_if_abandoned(answer: Message) -> bool:
    """Mark an answer whose claim went stale (its process died) as interrupted; True if so."""
    if not _claim_stale(answer):
        return False
    return await store.interrupt(answer, message=INTERRUPTED)
