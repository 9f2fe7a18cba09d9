"""rag.answers.follow: following an answer that another process generates."""

from __future__ import annotations

import asyncio

import pytest

from rag.answers import follow, notify, store
from rag.answers.events import DONE, METRICS, TOKEN, LogEvent
from rag.models import Message
from tests.conftest import wait_until
from tests.factories import streaming_answers
from tests.locks import connect

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_follower_elsewhere_reads_the_log_once_per_flush(monkeypatch):
    """While the answer is written, each NOTIFY costs the follower one read: no second read
    to find nothing, no look at the answer's row (three queries per flush, ten flushes a
    second, for every stream whose answer is generated in another process)."""
    monkeypatch.setattr(follow, "check_s", lambda: 600)  # only a notification wakes it
    reads, rows = [], []
    read_after, answer_row = store.read_after, follow._answer

    async def counted_read(*args):
        reads.append(args[-1])
        return await read_after(*args)

    async def counted_row(*args):
        rows.append(args)
        return await answer_row(*args)

    monkeypatch.setattr(store, "read_after", counted_read)
    monkeypatch.setattr(follow, "_answer", counted_row)
    [answer] = await streaming_answers(1)  # claimed now: by a process alive elsewhere
    key = str(answer.public_id)
    listener = await notify.listener()
    got: list[LogEvent] = []

    async def read_all() -> None:
        async for event in follow.follow(answer.pk, key=key):
            got.append(event)

    following = asyncio.ensure_future(read_all())
    await asyncio.to_thread(wait_until, lambda: rows, what="the follower to find the log empty")
    assert listener._followers.get(answer.pk)

    flushes = [[(TOKEN, "one "), (TOKEN, "two ")], [(TOKEN, "three")], [(METRICS, {}), (DONE, {"status": "complete"})]]
    seq = 0
    async with await connect(autocommit=True) as elsewhere:
        for flush in flushes:
            events = [LogEvent(answer.pk, key, seq + i, kind, data) for i, (kind, data) in enumerate(flush, start=1)]
            seq += len(events)
            if flush is flushes[-1]:
                await Message.objects.filter(pk=answer.pk).aupdate(status=Message.Status.COMPLETE, text="one two three")
            await store._insert(elsewhere, {answer.pk: events})  # its events, then its NOTIFY
            await asyncio.to_thread(wait_until, lambda s=seq: len(got) == s, what=f"event {seq}")
    await asyncio.wait_for(following, timeout=10)

    assert [e.seq for e in got] == [1, 2, 3, 4, 5]
    assert "".join(e.data for e in got if e.kind == TOKEN) == "one two three"
    assert reads == [0, 0, 2, 3]  # the empty log, then one read per flush
    assert len(rows) == 1
