"""rag.answers.store: what a flush of the event log writes, and the locks it takes."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from rag.answers import follow, store
from rag.answers.events import DONE, SOURCES, TOKEN, LogEvent
from rag.models import AnswerEvents, Message
from tests.factories import streaming_answers
from tests.locks import connect, lockable, row_locked, until_one_waits_for_a_lock
from tests.web.test_sse import TRICKY_TOKENS

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_flush_locks_the_rows_it_updates_in_id_order():
    """As a batch of final saves does: a flush and a batch of saves that lock two
    answers in different orders deadlock (it happened at c=1000)."""
    first, second = await streaming_answers(2)
    sources = [{"n": 1, "title": "t"}]
    batch = {a.pk: [LogEvent(a.pk, str(a.public_id), 1, SOURCES, sources)] for a in (second, first)}
    async with await connect(autocommit=True) as writer:
        async with row_locked(first.pk):
            flushing = asyncio.ensure_future(store._insert(writer, batch))
            await until_one_waits_for_a_lock()
            assert await lockable(second.pk)  # it waits for the first row before it locks the second
        await asyncio.wait_for(flushing, timeout=10)

    assert [m.sources async for m in Message.objects.filter(pk__in=[first.pk, second.pk])] == [sources, sources]


async def test_a_flush_stores_every_token_exactly_nul_included():
    [answer] = await streaming_answers(1)
    key = str(answer.public_id)
    events = [LogEvent(answer.pk, key, n, TOKEN, t) for n, t in enumerate(TRICKY_TOKENS, start=1)]
    async with await connect(autocommit=True) as writer:
        await store._insert(writer, {answer.pk: events})
    assert "\x00" in TRICKY_TOKENS
    assert [e.data for e in await store.read_after(answer.pk, key, 0)] == list(TRICKY_TOKENS)


async def test_an_event_after_a_quiet_spell_is_written_at_once_then_they_wait_for_the_interval(monkeypatch):
    """An answer's first token comes after the LLM's prefill: waiting a whole interval for it
    made followers in other processes see it 105 ms late. Later events still go in batches."""
    monkeypatch.setattr(store, "FLUSH_S", 600)
    [answer] = await streaming_answers(1)
    key = str(answer.public_id)
    writer = store.EventWriter()
    try:
        writer.append(LogEvent(answer.pk, key, 1, TOKEN, "first"))
        await asyncio.wait_for(writer.flushed(), timeout=10)  # not 600 s
        writer.append(LogEvent(answer.pk, key, 2, TOKEN, " second"))
        assert [e.seq for e in await store.read_after(answer.pk, key, 0)] == [1]  # within the interval: it waits
        writer.append(LogEvent(answer.pk, key, 3, DONE, {"status": "complete"}))  # an end goes at once
        await asyncio.wait_for(writer.flushed(), timeout=10)
    finally:
        writer._wake.set()  # a writer that failed the test would otherwise close after 600 s
        await writer.aclose()
    runs = [(r.first_seq, r.last_seq) async for r in AnswerEvents.objects.filter(message=answer).order_by("first_seq")]
    assert runs == [(1, 1), (2, 3)]


async def test_a_flush_retried_after_it_was_committed_replaces_its_run():
    """A flush whose connection broke after its commit (the reply lost) is written again,
    with the events appended since: no duplicate, and no unique violation retried forever."""
    [answer] = await streaming_answers(1)
    key = str(answer.public_id)
    events = [LogEvent(answer.pk, key, n, TOKEN, f"t{n} ") for n in range(1, 6)]
    async with await connect(autocommit=True) as writer:
        await store._insert(writer, {answer.pk: events[:3]})
        await store._insert(writer, {answer.pk: events})
    assert [e.seq for e in await store.read_after(answer.pk, key, 0)] == [1, 2, 3, 4, 5]
    assert await AnswerEvents.objects.filter(message=answer).acount() == 1


async def test_a_writer_whose_connection_broke_writes_on_a_new_one_at_once(caplog):
    """Postgres restarted or failed over: the next flush reconnects and writes, instead of
    failing and waiting a second while followers in other processes wait for the events."""
    [answer] = await streaming_answers(1)
    key = str(answer.public_id)
    writer = store.EventWriter()
    writer.append(LogEvent(answer.pk, key, 1, TOKEN, "before"))
    await asyncio.wait_for(writer.flushed(), timeout=10)
    async with await connect(autocommit=True) as other:
        await other.execute("SELECT pg_terminate_backend(%s)", [writer._conn.info.backend_pid])

    writer.append(LogEvent(answer.pk, key, 2, DONE, {"status": "complete"}))
    await asyncio.wait_for(writer.flushed(), timeout=10)

    assert [e.seq for e in await store.read_after(answer.pk, key, 0)] == [1, 2]
    assert not [r for r in caplog.records if r.name == "rag.answers.store"]  # not even one failed try
    await writer.aclose()


async def ended_long_ago(answer: Message, *, days: float) -> None:
    """As an answer saved ``days`` ago by a process that has long stopped renewing its claim."""
    then = timezone.now() - dt.timedelta(days=days)
    await Message.objects.filter(pk=answer.pk).aupdate(
        status=Message.Status.COMPLETE, text="t1 t2 t3 ", updated_at=then, claimed_at=then
    )


async def test_pruning_deletes_the_logs_of_answers_that_ended_before_the_cutoff_only():
    old, recent, streaming = await streaming_answers(3)
    async with await connect(autocommit=True) as writer:
        for answer in (old, recent, streaming):
            key = str(answer.public_id)
            for n in (1, 2, 3):  # a run per flush
                await store._insert(writer, {answer.pk: [LogEvent(answer.pk, key, n, TOKEN, f"t{n} ")]})
    await ended_long_ago(old, days=8)
    await ended_long_ago(recent, days=6)
    await Message.objects.filter(pk=streaming.pk).aupdate(updated_at=timezone.now() - dt.timedelta(days=8))

    cutoff = timezone.now() - dt.timedelta(days=7)
    assert await sync_to_async(store.prune_logs)(ended_before=cutoff, batch=2) == 3

    kept = {m async for m in AnswerEvents.objects.values_list("message_id", flat=True).distinct()}
    assert kept == {recent.pk, streaming.pk}  # a streaming answer's log is never pruned
    # The pruned answer still reads whole, from its row.
    events = [e async for e in follow.follow(old.pk, key=str(old.public_id))]
    assert [e.kind for e in events] == ["token", "metrics", "done"] and events[0].data == "t1 t2 t3 "
