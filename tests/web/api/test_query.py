"""POST /rag/query: the whole answer as one JSON document, and the body it takes."""

from __future__ import annotations

import json
import time

import pytest
from django.conf import settings

from rag.models import Message
from tests.factories import add_corpus
from tests.web.api.helpers import (
    error_of,
    live,
    post_query,
)

# --- answers -------------------------------------------------------------------------------------


@live
async def test_query_happy_path(live_server_url, http, fake_llm):
    await add_corpus()
    fake_llm.tokens = ["Bananas", " are", " yellow", " [1]", "\r\n", "[DONE]"]
    status, payload = await post_query(http, live_server_url, {"question": "What colour are bananas?", "k": 3})
    assert status == 200
    assert payload["answer"] == "Bananas are yellow [1]\r\n[DONE]"
    assert "error" not in payload
    assert len(payload["sources"]) == 3
    assert payload["sources"][0]["title"] == "Bananas"
    assert {"id", "title", "snippet", "score"} <= set(payload["sources"][0])
    metrics = payload["metrics"]
    assert metrics["status"] == "complete" and metrics["tokens"] == 6 and metrics["finish_reason"] == "stop"
    message = await Message.objects.aget(pk=metrics["message_id"])
    assert message.text == payload["answer"] and message.status == Message.Status.COMPLETE


@live
async def test_query_accepts_a_question_at_the_length_limit(live_server_url, http, fake_llm):
    question = ("word " * 400)[: settings.RAG_MAX_QUESTION_CHARS - 1] + "?"
    assert len(question) == settings.RAG_MAX_QUESTION_CHARS
    status, payload = await post_query(http, live_server_url, {"question": f"  {question}  "})
    assert status == 200, payload
    assert payload["answer"] == "Hello world!"


@live
@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ("http500", 502, "upstream_error"),
        ("http429", 502, "rate_limited"),
        ("embed500", 502, "upstream_error"),
        ("drop_after=2", 502, "bad_stream"),
        ("hang", 504, "timeout"),
    ],
)
async def test_query_upstream_failure_statuses(live_server_url, http, fake_llm, fault, status, code):
    await add_corpus()
    started = time.monotonic()
    got, payload = await post_query(http, live_server_url, {"question": f"pgvector? fault={fault}"})
    assert got == status, payload
    assert "error" in payload
    assert payload["error"]["code"] == code
    assert "server" in payload["error"]["message"] and fake_llm.base_url not in payload["error"]["message"]
    assert time.monotonic() - started < settings.RAG_LLM_TIMEOUT + 3
    if fault == "drop_after=2":
        assert payload["answer"] == "Hello world"


# --- bad bodies ----------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "hint"),
    [
        (b"{not json", "JSON"),
        (b"", "JSON"),
        (b'{"question": "x"', "JSON"),
        (b"\xff\xfe{}", "JSON"),
        (b'["question", "x"]', "object"),
        (b'"just a string"', "object"),
        (b"null", "object"),
        (b"{}", "question"),
        (b'{"question": null}', "question"),
        (b'{"question": 42}', "question"),
        (b'{"question": ["a"]}', "question"),
        (b'{"question": "   "}', "question"),
        (b'{"question": "ok", "k": 0}', "'k'"),
        (b'{"question": "ok", "k": -1}', "'k'"),
        (b'{"question": "ok", "k": 21}', "'k'"),
        (b'{"question": "ok", "k": 1.5}', "'k'"),
        (b'{"question": "ok", "k": 2.0}', "'k'"),
        (b'{"question": "ok", "k": true}', "'k'"),
        (b'{"question": "ok", "k": "abc"}', "'k'"),
        (b'{"question": "ok", "k": [1]}', "'k'"),
        (b'{"question": "ok", "k": {"n": 1}}', "'k'"),
        (b'{"question": "ok", "k": NaN}', "'k'"),
        (b'{"question": "ok", "k": Infinity}', "'k'"),
        (b'{"question": "ok", "k": 1e400}', "'k'"),
        (b'{"question": "ok", "colection": "handbook"}', "Unknown key 'colection': the body takes collection, filter"),
    ],
    ids=lambda v: ascii(v)[:40] if isinstance(v, bytes) else None,
)
async def test_query_rejects_bad_json_with_a_json_error(client, body, hint, fake_llm):
    # The test client leaves the content type out when the body is empty: give it explicitly then.
    extra = {} if body else {"CONTENT_TYPE": "application/json"}
    response = await client.post("/rag/query", body, content_type="application/json", **extra)
    message = error_of(response, 400)
    assert hint in message
    assert fake_llm.records == []


@pytest.mark.django_db
async def test_query_rejects_deeply_nested_json_without_a_500(client, fake_llm):
    body = b"[" * 100_000 + b"]" * 100_000  # 200 kB, well under DATA_UPLOAD_MAX_MEMORY_SIZE
    response = await client.post("/rag/query", body, content_type="application/json")
    assert "JSON" in error_of(response, 400)


@pytest.mark.django_db
async def test_query_rejects_a_question_that_is_not_valid_unicode_text(client, fake_llm):
    """JSON can carry a lone surrogate ("\\ud800"), which is no character at all: it cannot be
    stored or sent to the LLM as UTF-8, so it must be a 400, not a 500 from the database."""
    response = await client.post("/rag/query", b'{"question": "what is \\ud800?"}', content_type="application/json")
    assert response.status_code != 500
    assert "question" in error_of(response, 400)


@pytest.mark.django_db
async def test_query_rejects_a_body_over_the_upload_limit_with_a_json_error(client, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = json.dumps({"question": "x" * 2000}).encode()
    response = await client.post("/rag/query", body, content_type="application/json")
    assert 400 <= response.status_code < 500
    error_of(response, response.status_code)


@pytest.mark.django_db
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
async def test_query_wants_json_content_type(client, content_type):
    if content_type == "multipart/form-data":
        response = await client.post("/rag/query", {"question": "hi"})
    else:
        response = await client.post("/rag/query", '{"question": "hi"}', content_type=content_type)
    assert "application/json" in error_of(response, 415)


@pytest.mark.django_db
async def test_query_accepts_json_content_type_with_charset(client):
    """The charset parameter does not make JSON "wrong": validation runs (and rejects the body)."""
    response = await client.post("/rag/query", b"{}", content_type="application/json; charset=utf-8")
    assert "question" in error_of(response, 400)
