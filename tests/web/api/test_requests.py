"""What the endpoints make of a request before any answer: bad parameters, methods,
requests from other sites, URLs too long, the access log, /healthz."""

from __future__ import annotations

import json

import pytest
from django.test import AsyncClient

from rag.models import Message
from tests.factories import add_corpus
from tests.web.api.helpers import (
    error_of,
    live,
)

# --- bad parameters and methods ------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("params", "hint"),
    [
        ({}, "question"),
        ({"question": ""}, "question"),
        ({"question": "   \t\n "}, "question"),
        ({"question": "x" * 2001}, "2000"),
        ({"question": "a\x00b"}, "NUL"),
        ({"question": "ok", "k": "0"}, "'k'"),
        ({"question": "ok", "k": "-1"}, "'k'"),
        ({"question": "ok", "k": "abc"}, "'k'"),
        ({"question": "ok", "k": "1.5"}, "'k'"),
        ({"question": "ok", "k": "21"}, "20"),
        ({"question": "ok", "k": "9" * 5000}, "'k'"),
        ({"question": "ok", "format": "xml"}, "format"),
        ({"question": "ok", "format": "JSON"}, "format"),
    ],
    ids=lambda v: ascii(v)[:30] if isinstance(v, dict) else None,
)
async def test_stream_rejects_bad_input_with_a_json_error(client, params, hint, fake_llm):
    response = await client.get("/rag/stream", params)
    message = error_of(response, 400)
    assert hint in message
    assert fake_llm.records == []  # nothing reached the LLM
    assert fake_llm.embedding_requests == []


@pytest.mark.django_db
async def test_stream_limits_come_from_settings(client, settings):
    assert settings.RAG_MAX_QUESTION_CHARS == 2000 and settings.RAG_MAX_K == 20
    settings.RAG_MAX_QUESTION_CHARS = 10
    settings.RAG_MAX_K = 3
    assert "10" in error_of(await client.get("/rag/stream", {"question": "x" * 11}), 400)
    assert "3" in error_of(await client.get("/rag/stream", {"question": "x", "k": "4"}), 400)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("get", "/rag/query", "POST"),
        ("put", "/rag/query", "POST"),
        ("post", "/rag/stream", "GET"),
        ("delete", "/rag/stream", "GET"),
    ],
)
async def test_wrong_method_is_a_405_json_error(client, method, path, allowed):
    response = await getattr(client, method)(path)
    assert response.status_code == 405
    assert allowed in response["Allow"]
    assert allowed in error_of(response, 405)


@pytest.mark.django_db
async def test_head_of_the_stream_is_a_405_and_starts_no_answer(client):
    """HEAD would start an answer (the LLM asked for nothing) and daphne writes a streamed body
    even to a HEAD, onto a connection the client then reuses for its next request."""
    response = await client.head("/rag/stream", {"question": "What is a leaf?"})
    assert response.status_code == 405
    assert response["Allow"] == "GET"
    assert not await Message.objects.aexists()


# --- requests from other sites -------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({"Sec-Fetch-Site": "cross-site"}, False),  # a link or a page on another site
        ({"Sec-Fetch-Site": "same-site"}, False),  # another subdomain is another site's pages too
        ({"Origin": "https://evil.example"}, False),  # an older browser, from another site
        ({"Sec-Fetch-Site": "same-origin"}, True),  # this site's own pages
        ({"Sec-Fetch-Site": "none"}, True),  # typed in the address bar
        ({}, True),  # a program: no cookie of anybody's to abuse
    ],
)
async def test_a_signed_in_users_stream_from_another_site_plants_nothing(headers, allowed, fake_llm):
    from django.contrib.auth.models import User

    from rag.models import Conversation

    await add_corpus()
    client = AsyncClient()
    await client.aforce_login(await User.objects.acreate(username="victim"))
    response = await client.get("/rag/stream", {"question": "Planted question?"}, headers=headers)
    if allowed:
        assert response.status_code == 200
        [_ async for _ in response.streaming_content]
    else:
        assert response.status_code == 403 and "another site" in json.loads(response.content)["error"]
        query = await client.post(
            "/rag/query", {"question": "Planted?"}, content_type="application/json", headers=headers
        )
        assert query.status_code == 403
    planted = await Conversation.objects.filter(user__username="victim").aexists()
    assert planted == allowed


@pytest.mark.django_db(transaction=True)
async def test_an_anonymous_stream_from_another_site_is_answered(fake_llm):
    await add_corpus()
    response = await AsyncClient().get("/rag/stream", {"question": "Public?"}, headers={"Sec-Fetch-Site": "cross-site"})
    assert response.status_code == 200
    assert b"[DONE]" in b"".join([chunk async for chunk in response.streaming_content])


# --- the server around the views -----------------------------------------------------------------


@live
def test_a_question_too_long_for_a_url_gets_a_414_that_says_what_to_do(live_server_url):
    """daphne's HTTP layer reads request lines of at most 16 KiB and used to drop the
    connection on a longer one, with no response at all."""
    import socket
    import urllib.parse

    host, port = urllib.parse.urlsplit(live_server_url).netloc.split(":")
    # Just over the limit: with much more, the bytes still unread when the server closes make
    # its kernel reset the connection, which can discard the response before the client reads it.
    request = f"GET /rag/stream?question={'a' * 17_000} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 414 ")
    assert "POST to /rag/query" in json.loads(body)["error"]


@live
def test_the_access_log_keeps_the_route_and_not_the_question(fake_llm):
    import urllib.request

    from django.db import connection

    from tests.processes import app_env, start_daphne

    web = start_daphne(app_env(connection.settings_dict["NAME"], fake_llm.base_url), name="daphne-log")
    try:
        with urllib.request.urlopen(f"{web.url}/rag/stream?question=my+salary+is+secret", timeout=20) as response:
            assert b"[DONE]" in response.read()
    finally:
        web.stop()
    log = web.log()
    assert '"GET /rag/stream?<28 chars>" 200' in log  # "question=my+salary+is+secret"
    assert "salary" not in log


@pytest.mark.django_db(transaction=True)
async def test_healthz_keeps_the_databases_own_words_for_staff_and_the_log(monkeypatch, caplog):
    from django.contrib.auth.models import User
    from django.db import OperationalError

    from rag import warmup
    from rag.web import api

    async def unreachable() -> None:
        raise OperationalError('connection to server at "10.1.2.3", port 5432 failed: password for user "rag"')

    monkeypatch.setattr(warmup, "ready", lambda: True)
    monkeypatch.setattr(api, "_ping_database", unreachable)
    anonymous = await AsyncClient().get("/healthz")
    staff = AsyncClient()
    await staff.aforce_login(await User.objects.acreate(username="ops", is_staff=True))
    detailed = await staff.get("/healthz")

    assert anonymous.status_code == detailed.status_code == 503
    assert json.loads(anonymous.content)["database"] == "unreachable (the server log says why)"
    assert "10.1.2.3" not in anonymous.content.decode()
    assert "10.1.2.3" in json.loads(detailed.content)["database"]
    assert "10.1.2.3" in caplog.text
