"""Fuzzed inputs (Hypothesis) against every way in: /rag/stream, /rag/query, the chat form,
Last-Event-ID and the WebSocket. Whatever comes in: never a 500, never a traceback in the
log, and a stream that starts always ends with its end marker."""

from __future__ import annotations

import json
import logging
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rag.models import Collection
from tests.factories import add_corpus

pytestmark = pytest.mark.django_db(transaction=True)

FUZZ = settings(
    max_examples=int(os.environ.get("RAG_FUZZ_EXAMPLES", "40")),
    deadline=None,  # a 2-core machine shared with other work: timing is not what is tested
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: Any text, control characters, NUL and lone surrogates included (what a URL or a form can carry).
TEXT = st.text(alphabet=st.characters(codec=None), max_size=300)
ODD = st.one_of(TEXT, st.sampled_from(["", "0", "-1", "99999999999999999999", "1e3", "nan", "\x00", "%00", "a" * 3000]))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture
async def corpus(fake_llm) -> None:
    if not await Collection.objects.aexists():
        await add_corpus()


@pytest.fixture
def no_tracebacks(caplog):
    """Fails the test if anything logged an error with a traceback (a 500, a crashed task)."""
    yield
    crashed = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert crashed == [], [r.getMessage() for r in crashed]


async def read(response) -> bytes:
    if hasattr(response, "streaming_content"):
        return b"".join([chunk async for chunk in response.streaming_content])
    return response.content


def safe_params(params: dict[str, str]) -> dict[str, str]:
    """What a client can put in a URL: lone surrogates cannot be encoded, so they never arrive."""
    return {k: v.encode("utf-8", "replace").decode() for k, v in params.items()}


def valid_or_odd(*valid: str) -> st.SearchStrategy[str]:
    """Mostly values that pass, so that streams start and the answers' own paths are fuzzed."""
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), ODD)


@FUZZ
@given(
    question=TEXT,
    k=valid_or_odd("1", "4", ""),
    collection=valid_or_odd("", "default"),
    fmt=valid_or_odd("text", "json"),
    detach=valid_or_odd("0", "1"),
)
async def test_rag_stream_never_fails_on_its_parameters(corpus, no_tracebacks, question, k, collection, fmt, detach):
    from django.test import AsyncClient

    params = safe_params({"question": question, "k": k, "collection": collection, "format": fmt, "detach": detach})
    response = await AsyncClient().get("/rag/stream", params)
    body = await read(response)
    assert response.status_code in (200, 400, 404), body[:300]
    if response.status_code == 200:
        assert body.rstrip().endswith((b"data: [DONE]", b'data: {"done":true}')), body[-300:]
        assert b'"code": "internal"' not in body
    else:
        assert json.loads(body)["error"]


@FUZZ
@given(body=JSON)
async def test_rag_query_never_fails_on_its_body(corpus, no_tracebacks, body):
    from django.test import AsyncClient

    raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    response = await AsyncClient().post("/rag/query", raw, content_type="application/json")
    assert response.status_code in (200, 400, 404, 413, 502), response.content[:300]
    assert "error" in json.loads(response.content) or response.status_code == 200


@FUZZ
@given(last_event_id=ODD)
async def test_a_resume_never_fails_on_its_last_event_id(corpus, no_tracebacks, last_event_id):
    from django.test import AsyncClient

    value = last_event_id.encode("latin-1", "replace").decode("latin-1").replace("\r", "").replace("\n", "")
    response = await AsyncClient().get("/rag/stream", {"question": "q"}, headers={"Last-Event-ID": value})
    body = await read(response)
    assert response.status_code in (200, 204, 400, 404), body[:300]


@FUZZ
@given(question=TEXT, k=valid_or_odd("1", "4", ""), conversation=ODD, collection=valid_or_odd(""))
async def test_the_chat_form_never_fails_on_its_fields(corpus, no_tracebacks, question, k, conversation, collection):
    from django.test import AsyncClient

    fields = safe_params({"question": question, "k": k, "conversation": conversation, "collection": collection})
    response = await AsyncClient().post("/chat/ask", fields, headers={"HX-Request": "true"})
    assert response.status_code in (200, 404, 422), response.content[:300]


@FUZZ
@given(message=st.one_of(JSON, TEXT))
async def test_the_websocket_never_fails_on_a_message(corpus, no_tracebacks, message):
    from channels.testing import WebsocketCommunicator

    from ragsite.asgi import application

    headers = [(b"origin", b"http://127.0.0.1:8000"), (b"host", b"127.0.0.1:8000")]
    communicator = WebsocketCommunicator(application, "/ws/rag/", headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    text = message if isinstance(message, str) else json.dumps(message)
    # The test client cannot send an empty text frame; a space stands for it.
    await communicator.send_to(text_data=text.encode("utf-8", "replace").decode() or " ")
    reply = await communicator.receive_json_from(timeout=10)
    assert reply["type"] in ("error", "started", "sources", "token", "metrics", "done")
    if reply["type"] == "error":
        assert reply["code"] == "bad_request" and reply["message"]
    await communicator.disconnect()
