"""ragsite.middleware: Django's middleware on the event loop, CSRF included, and the 503 of a
request that could not reach the database."""

from __future__ import annotations

from urllib.parse import urlencode

import aiohttp
import pytest
from django.test import AsyncClient, RequestFactory

from rag.models import Message
from ragsite.middleware import SMALL_FORM_BYTES, _small_form
from tests.factories import add_corpus

pytestmark = pytest.mark.django_db(transaction=True)
FORM = "application/x-www-form-urlencoded"


async def test_a_small_form_checked_on_the_event_loop_still_needs_its_csrf_token(fake_llm):
    client = AsyncClient(enforce_csrf_checks=True)
    token = (await client.get("/")).cookies["csrftoken"].value

    async def ask(question: str, csrf: str):
        body = urlencode({"question": question, "csrfmiddlewaretoken": csrf})
        return await client.post("/chat/ask", body, content_type=FORM, headers={"HX-Request": "true"})

    assert (await ask("a wrong token", "x" * 32)).status_code == 403
    assert (await ask("no token", "")).status_code == 403
    assert (await ask("the page's token", token)).status_code == 200
    assert not await Message.objects.filter(text__in=["a wrong token", "no token"]).aexists()
    assert await Message.objects.filter(text="the page's token").aexists()


@pytest.mark.parametrize(
    ("content_type", "length", "inline"),
    [
        (FORM, "120", True),
        (FORM, str(SMALL_FORM_BYTES), True),
        (FORM, str(SMALL_FORM_BYTES + 1), False),  # parsed in a thread, as Django does
        (FORM, "", False),  # length unknown
        ("multipart/form-data; boundary=x", "120", False),  # upload handlers may write to disk
    ],
)
def test_which_bodies_are_parsed_on_the_event_loop(content_type, length, inline):
    request = RequestFactory().post("/chat/ask", content_type=content_type)
    request.META["CONTENT_LENGTH"] = length
    assert _small_form(request) is inline


async def test_while_the_database_is_down_requests_get_a_503_that_says_so(live_server_url, fake_llm, database_down):
    await add_corpus()
    await database_down.refuse()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{live_server_url}/rag/stream", params={"question": "pgvector?"}) as response:
            assert response.status == 503 and response.headers["Retry-After"] == "5"
            assert "database cannot be reached" in (await response.json())["error"]
        async with http.get(f"{live_server_url}/") as response:
            assert response.status == 503 and response.headers["Retry-After"] == "5"
            assert response.content_type == "text/plain"
            assert "nothing was saved" in await response.text()
        assert not [r for r in fake_llm.records if r.stream]  # nothing was asked of the LLM

        await database_down.allow()
        async with http.get(f"{live_server_url}/rag/stream", params={"question": "pgvector?"}) as response:
            assert response.status == 200
            assert (await response.text()).endswith("data: [DONE]\n\n")
