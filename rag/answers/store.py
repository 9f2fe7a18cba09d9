"""Writing an answer's events to Postgres in batches, and reading them back.

At 1,000 answers streaming at once, one INSERT per token would be 50,000 statements a
second. Instead each process buffers the events of all the answers it generates and
writes them every FLUSH_S seconds (or as soon as FLUSH_EVENTS are waiting, or an answer
ends) in one INSERT: one row per answer per flush, holding that answer's new events, and
one NOTIFY per flush naming the answers that moved, in the same transaction. Followers
in this process read the events from memory (rag.answers.live) and never wait for it;
followers in other processes are at most one flush behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import weakref

from asgiref.sync import sync_to_async
from django.db import IntegrityError, connection, transaction

from rag.answers.events import LogEvent
from rag.models import AnswerEvents
from rag.services.connections import release_connection

logger = logging.getLogger(__name__)

FLUSH_S = 0.1
FLUSH_EVENTS = 2000
EVENTS_CHANNEL = "rag_answer_events"
#: Postgres caps a NOTIFY payload at 8,000 bytes; a flush naming more answers sends several.
NOTIFY_BYTES = 7000


class EventWriter:
    """The batched writer of one event loop (one per server process)."""

    def __init__(self) -> None:
        self._pending: dict[int, list[LogEvent]] = {}
        self._count = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None

    def append(self, event: LogEvent) -> None:
        self._pending.setdefault(event.answer_id, []).append(event)
        self._count += 1
        self._idle.clear()
        if event.terminal or self._count >= FLUSH_EVENTS:
            self._wake.set()
        if self._task is None or self._task.done():
            # Its own context: the writer serves every request, and outlives each of them.
            self._task = asyncio.get_running_loop().create_task(self._run(), context=contextvars.Context())

    async def flushed(self) -> None:
        """Return once everything appended so far is written."""
        await self._idle.wait()

    async def _run(self) -> None:
        while self._pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_S)
            self._wake.clear()
            batch, self._pending, self._count = self._pending, {}, 0
            try:
                await _write(batch)
            except Exception:
                logger.exception("Writing %d answers' events failed; retrying", len(batch))
                for answer_id, events in batch.items():
                    self._pending[answer_id] = events + self._pending.get(answer_id, [])
                    self._count += len(events)
                await asyncio.sleep(1)
        self._idle.set()


_writers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventWriter] = weakref.WeakKeyDictionary()


def writer() -> EventWriter:
    loop = asyncio.get_running_loop()
    if loop not in _writers:
        _writers[loop] = EventWriter()
    return _writers[loop]


@sync_to_async(thread_sensitive=False)  # a batch belongs to no request
def _write(batch: dict[int, list[LogEvent]]) -> None:
    try:
        try:
            _insert(batch)
        except IntegrityError:
            # An answer deleted mid-stream (its conversation was deleted): write the
            # others one by one, and drop what cannot be written.
            for answer_id, events in batch.items():
                try:
                    _insert({answer_id: events})
                except IntegrityError:
                    logger.warning("Dropped the events of answer %d: it no longer exists", answer_id)
    finally:
        release_connection()


def _insert(batch: dict[int, list[LogEvent]]) -> None:
    rows = [
        AnswerEvents(
            message_id=answer_id,
            first_seq=events[0].seq,
            last_seq=events[-1].seq,
            events=json.dumps([[e.kind, e.data] for e in events], ensure_ascii=False),
        )
        for answer_id, events in batch.items()
    ]
    with transaction.atomic():
        AnswerEvents.objects.bulk_create(rows)
        with connection.cursor() as cursor:
            for payload in _payloads(f"{r.message_id}:{r.last_seq}" for r in rows):
                cursor.execute("SELECT pg_notify(%s, %s)", [EVENTS_CHANNEL, payload])


def _payloads(parts) -> list[str]:
    payloads, current = [], ""
    for part in parts:
        if current and len(current) + len(part) + 1 > NOTIFY_BYTES:
            payloads.append(current)
            current = ""
        current = f"{current} {part}" if current else part
    if current:
        payloads.append(current)
    return payloads


@sync_to_async
def read_after(answer_id: int, key: str, seq: int) -> list[LogEvent]:
    """The stored events of an answer after sequence number ``seq``, in order. The
    connection goes back to the pool: a follower may wait a while before its next read."""
    try:
        runs = AnswerEvents.objects.filter(message_id=answer_id, last_seq__gt=seq).order_by("first_seq")
        return [
            LogEvent(answer_id, key, first + i, kind, data)
            for first, events in runs.values_list("first_seq", "events")
            for i, (kind, data) in enumerate(json.loads(events))
            if first + i > seq
        ]
    finally:
        release_connection()
