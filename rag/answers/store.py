"""Writing an answer's events to Postgres in batches, and reading them back; and the
changes to an answer's row while it lives (its sources once known, claim renewals, Stop
before it began, the interruption of an answer whose process died). The final save of a finished answer,
text, status and metrics at once, is rag.services.answering's, batched with the others.

At 1,000 answers streaming at once, one INSERT per token would be 50,000 statements a
second. Instead each process buffers the events of all the answers it generates and
writes them at most every FLUSH_S seconds (sooner as soon as FLUSH_EVENTS are waiting, or
an answer ends) in one INSERT: one row per answer per flush, holding that answer's new
events, and one NOTIFY per flush naming the answers that moved, in the same transaction.
An event that comes after a quiet spell of FLUSH_S (an answer's first token, after the
LLM's prefill) is written at once. Followers in this process read the events from memory
(rag.answers.live) and never wait for it; followers in other processes are at most one
flush behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import json
import logging
import weakref

import psycopg
from asgiref.sync import sync_to_async
from django.db import connection as django_connection
from django.utils import timezone

from rag.answers.events import SOURCES, LogEvent, text_of
from rag.models import AnswerEvents, Message, storable
from rag.services.connections import release_connection

logger = logging.getLogger(__name__)

FLUSH_S = 0.1
#: The finish reason of an answer whose process died (rag.answers.follow).
INTERRUPTED = "interrupted"
FLUSH_EVENTS = 2000
EVENTS_CHANNEL = "rag_answer_events"
#: Postgres caps a NOTIFY payload at 8,000 bytes; a flush naming more answers sends several.
NOTIFY_BYTES = 7000


class EventWriter:
    """The batched writer of one event loop (one per server process), with a Postgres
    connection of its own, like the listener's: a flush never waits for one of the pool's
    connections, which the requests need, nor for a thread."""

    def __init__(self) -> None:
        self._pending: dict[int, list[LogEvent]] = {}
        self._count = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._conn: psycopg.AsyncConnection | None = None
        self._flushed_at = float("-inf")  # the event loop's time when the last flush ended

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
        loop = asyncio.get_running_loop()
        while self._pending:
            # The first token of a lone answer waited a whole FLUSH_S here, and a follower in
            # another process saw it 105-108 ms after this process's own streams did.
            wait = self._flushed_at + FLUSH_S - loop.time()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            batch, self._pending, self._count = self._pending, {}, 0
            try:
                await self._write_or_reconnect(batch)
            except (psycopg.Error, OSError):
                logger.exception("Writing %d answers' events failed; retrying", len(batch))
                await self._reconnect()
                for answer_id, events in batch.items():
                    self._pending[answer_id] = events + self._pending.get(answer_id, [])
                    self._count += len(events)
                await asyncio.sleep(1)
            self._flushed_at = loop.time()
        self._idle.set()

    async def _write_or_reconnect(self, batch: dict[int, list[LogEvent]]) -> None:
        """Write ``batch``, once more on a new connection if the connection failed: Postgres
        restarted or failed over, and the followers in other processes are waiting."""
        try:
            await self._write(batch)
        except (psycopg.Error, OSError):
            if self._conn is not None and not self._conn.broken:
                raise
            await self._reconnect()
            await self._write(batch)

    async def _write(self, batch: dict[int, list[LogEvent]]) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(**connection_params(), autocommit=True)
        try:
            await _insert(self._conn, batch)
        except psycopg.errors.ForeignKeyViolation:
            # An answer deleted mid-stream (its conversation was deleted): write the
            # others one by one, and drop what cannot be written.
            for answer_id, events in batch.items():
                try:
                    await _insert(self._conn, {answer_id: events})
                except psycopg.errors.ForeignKeyViolation:
                    logger.warning("Dropped the events of answer %d: it no longer exists", answer_id)

    async def aclose(self) -> None:
        """Write what is pending, then close the connection (a new append opens it again)."""
        await self.flushed()
        await self._reconnect()

    async def _reconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._conn.close()
        self._conn = None


_writers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventWriter] = weakref.WeakKeyDictionary()


def writer() -> EventWriter:
    loop = asyncio.get_running_loop()
    if loop not in _writers:
        _writers[loop] = EventWriter()
    return _writers[loop]


async def aclose() -> None:
    """Close this event loop's writer's connection, once what is pending is written."""
    found = _writers.get(asyncio.get_running_loop())
    if found is not None:
        await found.aclose()


# The flush's rows go as one JSON parameter, not as Postgres arrays: psycopg dumps an array
# element by element in Python, 2.9 ms per flush of 100 answers against 0.2 ms for json.dumps
# (a flush every 100 ms while answers stream).
# A flush retried after its connection broke may have been committed already (the reply was
# lost): the retry's run starts at the same event and holds as many or more (those appended
# since), so it replaces the stored one.
_INSERT = (
    f"INSERT INTO {AnswerEvents._meta.db_table} (message_id, first_seq, last_seq, events) "
    "SELECT message_id, first_seq, last_seq, events "
    "FROM json_to_recordset(%s::json) AS r(message_id bigint, first_seq int, last_seq int, events text) "
    "ON CONFLICT (message_id, first_seq) DO UPDATE SET last_seq = EXCLUDED.last_seq, events = EXCLUDED.events"
)
# The sources go on the answer's row as soon as they are known, not only with the final
# save: the admin hides answers that quote a collection the staff user may not read
# (Message.objects.citing_unreadable), the ones still being written included.
# The rows are locked in id order first, as the final saves lock theirs
# (answer_rows._save_fills): locked in the join's order, a flush and a batch of saves
# sharing two answers deadlocked at c=1000, and the flush waited a second to be retried.
_SOURCES = (
    "WITH s AS (SELECT * FROM json_to_recordset(%s::json) AS s(id bigint, sources jsonb)), "
    f"locked AS (SELECT id FROM {Message._meta.db_table} WHERE id IN (SELECT id FROM s) AND status = 'streaming' "
    "ORDER BY id FOR NO KEY UPDATE) "
    f"UPDATE {Message._meta.db_table} AS m SET sources = s.sources "
    "FROM s JOIN locked ON locked.id = s.id WHERE m.id = s.id"
)


async def _insert(conn: psycopg.AsyncConnection, batch: dict[int, list[LogEvent]]) -> None:
    """One statement for all the answers of the flush, and its NOTIFY, in one transaction.

    Not the ORM's bulk_create: at one answer at a time (ten flushes a second) its overhead
    was 62 ms of server CPU per 50-token answer, against 49-54 ms now (docs/benchmarks.md).
    """
    rows = [
        {
            "message_id": answer_id,
            "first_seq": events[0].seq,
            "last_seq": events[-1].seq,
            # The log keeps each run as JSON text, exactly (jsonb would refuse a NUL), and it goes
            # as a string inside the flush's JSON: as json, json_to_recordset would refuse the
            # NUL's \u0000 too (tests/answers/test_store.py).
            "events": json.dumps([[e.kind, e.data] for e in events], ensure_ascii=False),
        }
        for answer_id, events in batch.items()
    ]
    sourced = {answer_id: e.data for answer_id, events in batch.items() for e in events if e.kind == SOURCES}
    async with conn.transaction():
        await conn.execute(_INSERT, [json.dumps(rows, ensure_ascii=False)])
        if sourced:
            sources = [{"id": answer_id, "sources": data} for answer_id, data in sourced.items()]
            await conn.execute(_SOURCES, [json.dumps(sources, ensure_ascii=False)])
        for payload in _payloads(f"{row['message_id']}:{row['last_seq']}" for row in rows):
            await conn.execute("SELECT pg_notify(%s, %s)", [EVENTS_CHANNEL, payload])


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


def connection_params() -> dict:
    """Django's own connection settings, without what only Django's cursors use: for the
    connections this package keeps for itself (the writer's, the listener's)."""
    params = django_connection.get_connection_params()
    for key in ("cursor_factory", "context", "prepare_threshold"):
        params.pop(key, None)
    return params


@sync_to_async
def read_after(answer_id: int, key: str, seq: int) -> list[LogEvent]:
    """The stored events of an answer after sequence number ``seq``, in order. The
    connection goes back to the pool: a follower may wait a while before its next read."""
    try:
        return _stored_after(answer_id, key, seq)
    finally:
        release_connection()


def _stored_after(answer_id: int, key: str, seq: int) -> list[LogEvent]:
    runs = AnswerEvents.objects.filter(message_id=answer_id, last_seq__gt=seq).order_by("first_seq")
    return [
        LogEvent(answer_id, key, first + i, kind, data)
        for first, events in runs.values_list("first_seq", "events")
        for i, (kind, data) in enumerate(json.loads(events))
        if first + i > seq
    ]


def prune_logs(*, ended_before: dt.datetime, batch: int = 10_000) -> int:
    """Delete the event logs of the answers that ended before ``ended_before``; how many
    runs. Their text, sources and metrics are on their rows, and a client resumes an answer
    within seconds of losing it, not days: a log is about as large as its text again, in a
    row per flush. One read of such an answer from the start gets an end made from its row
    (rag.answers.follow._rest). In batches, so that no statement holds many rows' locks."""
    ended = Message.objects.exclude(status=Message.Status.STREAMING).filter(updated_at__lt=ended_before)
    deleted = 0
    while True:
        runs = AnswerEvents.objects.filter(message__in=ended.values("pk")).values_list("pk", flat=True)[:batch]
        count, _ = AnswerEvents.objects.filter(pk__in=list(runs)).delete()
        deleted += count
        if count < batch:
            return deleted


# --- the answer's row, while it lives ---------------------------------------------------------


@sync_to_async(thread_sensitive=False)  # a generation's task belongs to no request
def renew_claim(answer_id: int, *, text: str) -> None:
    """A live generation says so, with its text so far in case its process dies."""
    try:
        Message.objects.filter(pk=answer_id, status=Message.Status.STREAMING).update(
            claimed_at=timezone.now(), text=storable(text)
        )
    finally:
        release_connection()  # the answer goes on streaming


async def stop_unclaimed(answer_id: int) -> bool:
    """Stop an answer nobody has begun, so that it never begins; False if someone had.
    It stays unclaimed: no process will store a log for it (rag.answers.follow)."""
    unclaimed = Message.objects.filter(pk=answer_id, status=Message.Status.STREAMING, claimed_at__isnull=True)
    return bool(await unclaimed.aupdate(status=Message.Status.STOPPED, finish_reason="stopped"))


@sync_to_async
def interrupt(answer: Message, *, message: str) -> bool:
    """End an answer whose claim went stale as interrupted, keeping the longer of the text
    of its last renewal and the text in its log (flushed more often); False if its claim
    moved meanwhile (it is alive) or it ended."""
    try:
        logged = text_of(_stored_after(answer.pk, str(answer.public_id), 0))
        text = logged if len(logged) > len(answer.text) else answer.text
        stale = Message.objects.filter(pk=answer.pk, status=Message.Status.STREAMING, claimed_at=answer.claimed_at)
        return bool(
            stale.update(status=Message.Status.ERROR, finish_reason=INTERRUPTED, error=message, text=storable(text))
        )
    finally:
        release_connection()
