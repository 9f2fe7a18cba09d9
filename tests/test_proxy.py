"""deploy/nginx.conf, run: nginx as docker-compose configures it, in front of two daphne
processes on one database. A browser's requests reach one process, so that its answer's
stream follows the generation from memory; browsers and cookie-less clients are spread over
both; streams and the WebSocket pass through; and when a browser's process dies, the proxy
hands it to the other, where its answer resumes. Real processes, real HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import aiohttp
import pytest

from rag.models import Message
from tests.answers.test_across_processes import ask, kill_once_stored, read, tokens_of
from tests.conftest import new_browser_session, wait_until
from tests.factories import add_corpus
from tests.processes import Process, Proxy, start_nginx

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def proxy(two_webs: tuple[Process, Process]) -> Iterator[Proxy]:
    proxy = start_nginx(ports=[web.port for web in two_webs])
    yield proxy
    proxy.stop()


async def served_by(proxy: Proxy, path: str, *, requests: int = 1) -> list[int]:
    """The upstream port of each request for ``path``, once ``requests`` of them are logged:
    nginx logs a request after its last byte has gone, which its client may read first."""

    def logged() -> list[int]:
        return [port for _, routed, port in proxy.routes() if routed == path]

    done = f"{requests} requests for {path}, logged"
    return await asyncio.to_thread(wait_until, lambda: len(logged()) >= requests and logged(), what=done)


async def test_a_browsers_question_and_its_stream_reach_the_generating_process(
    proxy, two_webs, browser_session, fake_llm
):
    await add_corpus()
    fake_llm.tokens = [f"w{i} " for i in range(10)]
    answer_id = await ask(browser_session, proxy)  # the page (which sets the CSRF cookie), then the question
    events = await read(browser_session, proxy, answer_id)

    assert tokens_of(events) == fake_llm.tokens and events[-1].type == "done"
    [asked] = await served_by(proxy, "/chat/ask")
    [streamed] = await served_by(proxy, f"/chat/answers/{answer_id}/stream")
    assert asked == streamed and asked in {web.port for web in two_webs}


async def test_browsers_and_clients_without_cookies_are_spread_over_both_processes(proxy, two_webs):
    async def pages_of_a_browser(n: int) -> None:
        async with new_browser_session() as session:
            for _ in range(3):  # the first sets the CSRF cookie; the next two carry it
                async with session.get(f"{proxy.url}/?browser={n}") as response:
                    assert response.status == 200

    await asyncio.gather(*(pages_of_a_browser(n) for n in range(24)))
    async with aiohttp.ClientSession() as client:  # no cookie jar: an API client
        for _ in range(24):
            async with client.get(f"{proxy.url}/healthz") as response:
                assert response.status == 200

    ports = {web.port for web in two_webs}
    carrying_the_cookie = [(await served_by(proxy, f"/?browser={n}", requests=3))[1:] for n in range(24)]
    assert all(len(set(pages)) == 1 for pages in carrying_the_cookie)  # one process per browser
    assert {pages[0] for pages in carrying_the_cookie} == ports  # 24 browsers all on one: p = 2**-23
    assert set(await served_by(proxy, "/healthz", requests=24)) == ports


async def test_when_a_browsers_process_dies_its_answer_resumes_on_the_other(proxy, two_webs, browser_session, fake_llm):
    await add_corpus()
    fake_llm.tokens = [f"w{i} " for i in range(40)]
    fake_llm.inter_token_ms = 200  # long enough to kill its process in the middle
    answer_id = await ask(browser_session, proxy)
    first = await read(browser_session, proxy, answer_id, tokens=3)
    [asked] = await served_by(proxy, "/chat/ask")
    generating = next(web for web in two_webs if web.port == asked)
    other = next(web for web in two_webs if web is not generating)
    await kill_once_stored(generating, answer_id, seen=first[-1])

    # What an EventSource does when its stream breaks: the same URL, with the last id it saw.
    rest = await asyncio.wait_for(read(browser_session, proxy, answer_id, last_event_id=first[-1].id), timeout=30)

    first_stream, resumed = await served_by(proxy, f"/chat/answers/{answer_id}/stream", requests=2)
    assert (first_stream, resumed) == (generating.port, other.port)
    assert any(e.type == "error" and "interrupted" in e.data for e in rest) and rest[-1].type == "done"
    answer = await Message.objects.aget(pk=answer_id)
    assert answer.finish_reason == "interrupted"
    assert answer.text.startswith("".join(tokens_of(first)))


async def test_the_websocket_goes_through_the_proxy(proxy, browser_session, fake_llm):
    """The upgrade is passed on, and so is the Host with its port, which the socket's origin
    check compares with the page's Origin."""
    await add_corpus()
    async with browser_session.ws_connect(f"{proxy.url}/ws/rag/", origin=proxy.url) as ws:
        await ws.send_json({"type": "ask", "question": "pgvector?"})
        kinds = []
        while not kinds or kinds[-1] != "done":
            kinds.append(json.loads((await ws.receive(timeout=20)).data)["type"])
    assert kinds[0] == "started" and "token" in kinds and kinds[-1] == "done"
