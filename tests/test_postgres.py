"""ragsite.postgres: when Postgres restarts or fails over, every connection it had breaks at
once; no request, stream or save may pay for it."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from django.db import OperationalError, connection

from rag.answers import follow, live
from rag.answers.access import Owner
from rag.models import Message
from rag.services import chat
from rag.services.connections import arelease_connection
from tests.answers.test_across_processes import TOKENS, ask, read, tokens_of
from tests.conftest import wait_until
from tests.factories import add_corpus
from tests.fake_openai import FakeOpenAI

pytestmark = pytest.mark.django_db(transaction=True)
OWNER = Owner(user_id=None, session_key="postgres-restart")


def test_the_first_borrow_after_a_restart_replaces_every_broken_connection(database_down):
    pool = connection.pool
    connection.close()  # this thread's connection back to the pool, to be broken with the others
    held = [pool.getconn() for _ in range(4)]
    for conn in held:
        pool.putconn(conn)
    idle = pool.get_stats()["pool_available"]
    lost = pool.get_stats().get("connections_lost", 0)
    assert idle >= 4 and database_down.end_connections() >= idle

    with connection.cursor() as cursor:  # psycopg_pool's own check would find one broken per try,
        cursor.execute("SELECT 1")  # pausing 0.9, 1.8, 3.6 s between: past its 10 s timeout
        assert cursor.fetchone() == (1,)

    assert pool.get_stats()["connections_lost"] - lost >= idle  # all of them, at the first borrow
    assert pool.get_stats().get("requests_errors", 0) == 0


@pytest.fixture
def slow_llm(fake_llm: FakeOpenAI) -> FakeOpenAI:
    fake_llm.tokens = TOKENS
    fake_llm.inter_token_ms = 50
    return fake_llm


async def test_an_answer_streaming_when_every_connection_drops_is_saved_whole(two_webs, slow_llm, database_down):
    a, b = two_webs
    await add_corpus()
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=aiohttp.ClientTimeout(total=60)
    ) as http:
        answer_id = await ask(http, a)
        on_a, on_b = [], []  # generated on a; followed on b through the database
        reading = asyncio.gather(read(http, a, answer_id, into=on_a), read(http, b, answer_id, into=on_b))
        await asyncio.to_thread(wait_until, lambda: len(tokens_of(on_b)) >= 5, what="b to follow the answer")

        await arelease_connection()  # what the test's ORM calls held, back to the pool
        assert await asyncio.to_thread(database_down.end_connections) >= 4  # both processes' pools and listeners

        await asyncio.wait_for(reading, timeout=30)
        for web in (a, b):
            async with http.get(f"{web.url}/healthz") as response:
                assert response.status == 200, await response.text()

    for events in (on_a, on_b):
        assert "".join(tokens_of(events)) == "".join(TOKENS)  # no gap, no duplicate
        assert [e.type for e in events][-2:] == ["metrics", "done"]
    answer = await Message.objects.aget(pk=answer_id)
    assert answer.status == Message.Status.COMPLETE and answer.text == "".join(TOKENS)


async def test_an_answer_that_ends_while_the_database_is_down_is_saved_once_it_is_back(
    fake_llm, database_down, monkeypatch, settings
):
    """However long Postgres stays down: here longer than the answer's claim would last."""
    await add_corpus()
    monkeypatch.setattr(connection.pool, "timeout", 0.5)  # not the 10 s a server waits
    settings.RAG_CLAIM_RENEW_S = 0.5  # a claim goes stale in 1.5 s
    fake_llm.tokens = TOKENS
    fake_llm.inter_token_ms = 20
    answer = await chat.ask(owner=OWNER, question="pgvector?", k=1)
    seen = []
    async for event in follow.follow(answer.pk, key=str(answer.public_id)):
        seen.append(event)
        if event.kind == "token":
            break

    await database_down.refuse()
    await asyncio.to_thread(
        wait_until, lambda: any(r.stream and r.finished for r in fake_llm.records), what="the answer to end"
    )
    # The outage's length is what is under test: twice the claim's life after the answer ended.
    await asyncio.sleep(2 * follow.claim_stale_s())
    await database_down.allow()

    rest = [e async for e in follow.follow(answer.pk, key=str(answer.public_id), after=seen[-1].seq)]
    assert [e.kind for e in rest][-2:] == ["metrics", "done"]
    assert "".join(e.data for e in seen + rest if e.kind == "token") == "".join(TOKENS)
    await live.wait_idle()
    saved = await Message.objects.aget(pk=answer.pk)
    assert saved.status == Message.Status.COMPLETE and saved.text == "".join(TOKENS)


async def test_the_pool_connects_again_within_seconds_of_postgres_coming_back(database_down, monkeypatch):
    """psycopg_pool tries again 1, 2, 4, 8... s apart: after a 40 s outage the app stayed
    down 18 s longer than Postgres did (measured against a daphne)."""
    pool = connection.pool
    await database_down.refuse()
    failed_borrows = pool.get_stats().get("requests_errors", 0)
    monkeypatch.setattr(pool, "timeout", 0.5)
    while pool.get_stats().get("requests_errors", 0) < failed_borrows + 20:  # about 10 s of outage:
        with pytest.raises(OperationalError):  # the stock schedule's next try is some 5 s away
            await Message.objects.acount()
    await database_down.allow()

    monkeypatch.setattr(pool, "timeout", 3.0)
    assert await Message.objects.acount() == 0  # a connection within 3 s
