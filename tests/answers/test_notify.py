"""rag.answers.notify: one LISTEN connection per process, and what happens when it drops."""

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.utils import timezone

from rag.answers import follow, notify
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
    monkeypatch.setattr(notify, "RECONNECT_S", 0.05)
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
