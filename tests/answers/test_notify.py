"""rag.answers.notify: one LISTEN connection per process, and what happens when it drops."""

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.utils import timezone

from rag.answers import follow, live, notify, store
from rag.answers.access import Owner
from rag.models import AnswerEvents, Message
from rag.services import chat
from tests.conftest import wait_until
from tests.factories import add_corpus

pytestmark = pytest.mark.django_db(transaction=True)
OWNER = Owner(user_id=None, session_key="notify-session")


@sync_to_async
def kill_the_listening_connection(listener: notify.Listener) -> int:
    """Terminate this process's LISTEN connection (a daphne of another test may listen too)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s AND query LIKE 'LISTEN %%'",
            [listener.backend_pid],
        )
        return len(cursor.fetchall())


@sync_to_async
def another_process_writes(answer: Message) -> None:
    """What the process generating ``answer`` elsewhere stores: its events, then NOTIFY."""
    events = [["token", "from elsewhere"], ["metrics", {"status": "complete"}], ["done", {"status": "complete"}]]
    AnswerEvents.objects.create(message=answer, first_seq=1, last_seq=3, events=json.dumps(events))
    Message.objects.filter(pk=answer.pk).update(status=Message.Status.COMPLETE, text="from elsewhere")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify('rag_answer_events', %s)", [f"{answer.pk}:3"])


async def test_followers_are_woken_after_the_listening_connection_comes_back(fake_llm, monkeypatch):
    # No claim checks to fall back on within the test: only a notification can wake the follower.
    monkeypatch.setattr(follow, "check_s", lambda: 600)
    # A dropped connection is opened again at once (the pause is for a database that stays down).
    monkeypatch.setattr(notify, "RECONNECT_S", 600)
    await add_corpus()
    answer = await chat.ask(owner=OWNER, question="pgvector?", k=1, start=False)
    # Claimed by a process that is alive elsewhere: this one only follows.
    await Message.objects.filter(pk=answer.pk).aupdate(claimed_at=timezone.now())
    listener = await notify.listener()  # connected and listening
    events = await chat.stream_turn(owner=OWNER, answer_id=answer.pk)
    first = asyncio.ensure_future(anext(events))
    await asyncio.to_thread(wait_until, lambda: listener._followers.get(answer.pk), what="the follower to subscribe")
    assert await kill_the_listening_connection(listener) == 1

    await another_process_writes(await Message.objects.aget(pk=answer.pk))

    # The listener opens a new connection and wakes every follower, which re-reads the log:
    # whatever was notified while it was down is not lost.
    got = [await asyncio.wait_for(first, timeout=10)] + [e async for e in events]
    assert [e.kind for e in got] == ["token", "metrics", "done"]
    assert got[0].data == "from elsewhere"


@sync_to_async
def backend_alive(pid: int | None) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
        return cursor.fetchone()[0] == 1


async def test_closing_the_listener_ends_its_connection_and_listening_again_reopens_it(fake_llm):
    listener = await notify.listener()
    before = listener.backend_pid
    assert await backend_alive(before)

    await notify.aclose()
    deadline = asyncio.get_running_loop().time() + 10
    while await backend_alive(before):  # the server ends the backend as the connection closes
        assert asyncio.get_running_loop().time() < deadline, "the LISTEN connection is still open"
        await asyncio.sleep(0.01)  # the poll interval of a condition wait, not a race-hiding delay

    again = await notify.listener()
    assert again is listener and again.backend_pid != before and await backend_alive(again.backend_pid)


async def test_closing_the_writer_writes_what_is_pending_first(fake_llm):
    await add_corpus()
    fake_llm.inter_token_ms = 20
    answer = await chat.ask(owner=OWNER, question="What does pgvector add?", k=2)
    key = str(answer.public_id)
    seen = []
    async for event in follow.follow(answer.pk, key=key):
        seen.append(event)
        if event.kind == "token":
            break
    await store.aclose()  # mid-answer, within a flush interval of the first token
    assert store.writer()._conn is None
    assert [e.seq for e in await store.read_after(answer.pk, key, 0)][: len(seen)] == [e.seq for e in seen]
    # The answer goes on, and the writer opens a connection again for the rest.
    rest = [event async for event in follow.follow(answer.pk, key=key, after=seen[-1].seq)]
    await live.wait_idle()
    assert [e.seq for e in await store.read_after(answer.pk, key, 0)] == [e.seq for e in seen + rest]
