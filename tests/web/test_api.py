"""The HTTP endpoints: GET /rag/stream (SSE) and POST /rag/query (JSON).

Streaming tests talk to the app under daphne (``live_server_url``) with aiohttp over real HTTP,
the app talks to the fake OpenAI server over real HTTP, and every stream is read back with the
spec-conformant parser in tests.sse. Input validation is checked in-process with AsyncClient.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import AsyncClient
from multidict import CIMultiDictProxy

from rag.models import Message
from tests import processes
from tests.conftest import wait_until
from tests.factories import add_corpus
from tests.fake_openai import CHAT_FAULT_CODES
from tests.sse import Event, SSEParser
from tests.web.test_sse import TRICKY_TOKENS, as_sse_sees_it

live = pytest.mark.django_db(transaction=True)

STREAM_TIMEOUT = 20  # seconds; a stream that does not end by then is a hang, and fails the test
OPENING = " stream open"

#: How soon the upstream must see a client that left: at once, but a busy 2-core machine may
#: take a few hundred ms to schedule it; the rest of the answer would take a second or more.
PROMPTLY_S = 0.5


# --- helpers ------------------------------------------------------------------------------------


@dataclass
class Streamed:
    """A stream as the client saw it: comments and events in arrival order."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    timeline: list[Event | str] = field(default_factory=list)  # str: a comment
    parser: SSEParser = field(default_factory=SSEParser)

    @property
    def events(self) -> list[Event]:
        return [item for item in self.timeline if isinstance(item, Event)]

    def feed(self, chunk: bytes) -> list[Event]:
        """Feed byte by byte, so comments and events keep their exact relative order."""
        new: list[Event] = []
        for i in range(len(chunk)):
            seen = len(self.parser.comments)
            events = self.parser.feed(chunk[i : i + 1])
            self.timeline += self.parser.comments[seen:]
            self.timeline += events
            new += events
        return new


def tokens_text(events: list[Event]) -> list[str]:
    """Data of the unnamed events, which in ``text`` format are the tokens and the end marker."""
    return [e.data for e in events if e.type == "message"]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # auto_decompress=False: the test sees the bytes as sent.
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=STREAM_TIMEOUT), auto_decompress=False
    ) as session:
        yield session


async def stream(
    http: aiohttp.ClientSession, base: str, params: dict[str, str], headers: dict[str, str] | None = None
) -> Streamed:
    async with http.get(f"{base}/rag/stream", params=params, headers=headers) as resp:
        result = Streamed(status=resp.status, headers=resp.headers, body=b"")
        async for chunk in resp.content.iter_any():
            result.body += chunk
            result.feed(chunk)
    return result


def normalized(tokens: list[str]) -> str:
    return "".join(as_sse_sees_it(t) for t in tokens)


def last_assistant_message() -> Message | None:
    return Message.objects.filter(role=Message.Role.ASSISTANT).order_by("-id").first()


async def wait_for_final_message() -> Message:
    """The assistant message once the server has given it a final status."""

    def final() -> Message | None:
        message = last_assistant_message()
        return message if message is not None and message.status != Message.Status.STREAMING else None

    return await sync_to_async(wait_until)(final, timeout=5.0, what="the answer to be saved")  # type: ignore[return-value]


# --- the stream: headers and event order ---------------------------------------------------------


@live
async def test_stream_headers_and_event_order(live_server_url, http, fake_llm):
    await add_corpus()
    fake_llm.tokens = ["pgvector", " adds", " vectors"]
    result = await stream(
        http,
        live_server_url,
        {"question": "What does pgvector add to Postgres?", "k": "2"},
        headers={"Accept-Encoding": "gzip, deflate, br"},
    )

    assert result.status == 200
    assert result.headers["Content-Type"].split(";")[0].strip() == "text/event-stream"
    assert result.headers["Cache-Control"] == "no-cache"
    assert result.headers["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in result.headers
    assert "Content-Length" not in result.headers
    assert result.body.startswith(b": stream open\n\n")

    events = result.events
    assert [e.type for e in events] == ["sources", "message", "message", "message", "metrics", "message"]
    sources = json.loads(events[0].data)
    assert isinstance(sources, list) and len(sources) == 2
    for source in sources:
        assert {"id", "title", "snippet", "score"} <= set(source)
        assert isinstance(source["id"], int) and isinstance(source["score"], float)
    assert sources[0]["title"] == "pgvector"
    assert tokens_text(events[1:4]) == ["pgvector", " adds", " vectors"]
    metrics = json.loads(events[4].data)
    assert metrics["status"] == "complete" and metrics["tokens"] == 3 and metrics["finish_reason"] == "stop"
    assert {"tokens_per_s", "gap_p50_ms", "gap_p95_ms", "gap_max_ms"} <= metrics.keys()
    assert events[-1].data == "[DONE]"
    assert result.body.endswith(b"data: [DONE]\n\n")
    assert result.timeline[0] == OPENING

    message = await Message.objects.aget(pk=metrics["message_id"])
    assert message.status == Message.Status.COMPLETE and message.text == "pgvector adds vectors"
    assert metrics["gap_p95_ms"] == message.gap_p95_ms and metrics["tokens_per_s"] == message.tokens_per_s


@live
async def test_stream_json_format_event_order(live_server_url, http, fake_llm):
    await add_corpus()
    result = await stream(http, live_server_url, {"question": "Tell me about bananas", "format": "json", "k": "1"})
    assert result.status == 200
    assert [e.type for e in result.events] == ["sources", "message", "message", "message", "metrics", "done"]
    assert [json.loads(e.data)["token"] for e in result.events[1:4]] == ["Hello", " world", "!"]
    assert json.loads(result.events[-1].data) == {"done": True}
    assert b"[DONE]" not in result.body


@live
async def test_tokens_reach_the_client_while_the_llm_is_still_generating(live_server_url, http, fake_llm):
    """Nothing buffers the stream: the first token arrives while the fake still has tokens to send."""
    await add_corpus()
    fake_llm.tokens = [f"t{i} " for i in range(10)]
    fake_llm.inter_token_ms = 100
    sent_when_first_seen = None
    async with http.get(f"{live_server_url}/rag/stream", params={"question": "pgvector?"}) as resp:
        result = Streamed(status=resp.status, headers=resp.headers, body=b"")
        async for chunk in resp.content.iter_any():
            for event in result.feed(chunk):
                if event.type == "message" and sent_when_first_seen is None:
                    sent_when_first_seen = fake_llm.records[-1].tokens_sent
    assert sent_when_first_seen is not None
    assert sent_when_first_seen < 10
    assert tokens_text(result.events)[:-1] == fake_llm.tokens


def assert_only_the_servers_ids(result) -> None:
    """No token injected an ``id:`` or a ``retry:``: the ids are the server's own, one per
    event, <answer's public id>.1, .2, ... to the end marker."""
    assert result.parser.retry is None
    ids = [e.id for e in result.events]
    key = ids[0].split(".")[0]
    assert ids == [f"{key}.{n}" for n in range(1, len(ids) + 1)]
    assert result.parser.last_event_id == ids[-1]


# --- tricky tokens end to end --------------------------------------------------------------------

SAFE_TRICKY = [t for t in TRICKY_TOKENS if t != "\x00"]


@live
async def test_tricky_tokens_seed_client_stops_at_a_done_token(live_server_url, http, fake_llm):
    """A seed-style client (stop at the first ``data: [DONE]``) loses everything from a token that is
    exactly "[DONE]" on: in ``text`` format that token cannot be told from the end marker. This is a
    documented limit of the seed protocol (see rag/web/sse.py); ``format=json`` does not have it."""
    await add_corpus()
    fake_llm.tokens = list(TRICKY_TOKENS)
    result = await stream(http, live_server_url, {"question": "pgvector?"})
    assert result.status == 200

    seen: list[str] = []
    stopped_early = False
    events = result.events
    for i, event in enumerate(events):
        if event.type != "message":
            continue
        if event.data == "[DONE]":
            stopped_early = i < len(events) - 1
            break
        seen.append(event.data)

    done_at = TRICKY_TOKENS.index("[DONE]")
    assert "".join(seen) == normalized(TRICKY_TOKENS[:done_at])
    assert stopped_early  # more of the answer followed the lone "[DONE]" token
    assert len("".join(seen)) < len(normalized(TRICKY_TOKENS))


@live
async def test_tricky_tokens_client_reading_until_close_gets_every_token(live_server_url, http, fake_llm):
    """A client that treats ``[DONE]`` as data and waits for the stream to close gets every token,
    with CR and CRLF turned into LF as SSE requires."""
    await add_corpus()
    fake_llm.tokens = list(TRICKY_TOKENS)
    result = await stream(http, live_server_url, {"question": "pgvector?"})
    assert result.status == 200
    data = tokens_text(result.events)
    assert data[-1] == "[DONE]"  # the real end marker
    assert data[:-1] == [as_sse_sees_it(t) for t in TRICKY_TOKENS]
    assert "".join(data[:-1]) == normalized(TRICKY_TOKENS)
    assert_only_the_servers_ids(result)


@live
async def test_tricky_tokens_json_format_is_exact(live_server_url, http, fake_llm):
    await add_corpus()
    fake_llm.tokens = list(TRICKY_TOKENS)
    result = await stream(http, live_server_url, {"question": "pgvector?", "format": "json"})
    assert result.status == 200
    tokens = [json.loads(e.data)["token"] for e in result.events if e.type == "message"]
    assert tokens == TRICKY_TOKENS
    assert "".join(tokens) == "".join(TRICKY_TOKENS)
    assert result.events[-1].type == "done"
    assert_only_the_servers_ids(result)


@live
async def test_tricky_answer_without_nul_is_saved_complete(live_server_url, http, fake_llm):
    await add_corpus()
    fake_llm.tokens = list(SAFE_TRICKY)
    result = await stream(http, live_server_url, {"question": "pgvector?", "format": "json"})
    assert [e.type for e in result.events][-2:] == ["metrics", "done"]
    metrics = json.loads(result.events[-2].data)
    assert metrics["status"] == "complete" and metrics["tokens"] == len(SAFE_TRICKY)
    message = await Message.objects.aget(pk=metrics["message_id"])
    assert message.status == Message.Status.COMPLETE
    assert message.text == "".join(SAFE_TRICKY)


@live
async def test_answer_with_a_nul_token_is_still_saved(live_server_url, http, fake_llm):
    """An LLM can emit U+0000, which a Postgres text column cannot hold. The answer must still end
    with ``metrics`` and be saved as complete (with the NUL dropped or replaced), not fail at the very
    end and leave the message "streaming" forever."""
    await add_corpus()
    fake_llm.tokens = ["before", "\x00", "after"]
    result = await stream(http, live_server_url, {"question": "pgvector?", "format": "json"})
    assert [json.loads(e.data)["token"] for e in result.events if e.type == "message"] == ["before", "\x00", "after"]
    assert result.events[-1].type == "done"
    assert result.events[-2].type == "metrics", json.loads(result.events[-2].data)
    message = await wait_for_final_message()
    assert message.status == Message.Status.COMPLETE
    assert message.text.replace("\ufffd", "") == "beforeafter"


# --- cancellation --------------------------------------------------------------------------------


@live
async def test_client_disconnect_closes_the_upstream_request_and_keeps_the_partial_answer(
    live_server_url, http, fake_llm
):
    await add_corpus()
    fake_llm.tokens = [f"t{i} " for i in range(40)]
    fake_llm.inter_token_ms = 50
    full = "".join(fake_llm.tokens)
    seen: list[str] = []

    resp = await http.get(f"{live_server_url}/rag/stream", params={"question": "pgvector?"})
    try:
        assert resp.status == 200
        result = Streamed(status=resp.status, headers=resp.headers, body=b"")
        async for chunk in resp.content.iter_any():
            seen += [e.data for e in result.feed(chunk) if e.type == "message"]
            if len(seen) >= 3:
                break
        close_time = time.monotonic()
    finally:
        resp.close()  # closes the connection, not just releases it

    assert len(seen) >= 3
    record = await asyncio.to_thread(fake_llm.wait_for_close, timeout=3)
    assert record.closed_by_client
    assert not record.finished
    assert record.tokens_sent < 40
    assert record.ended_at is not None
    assert record.ended_at - close_time < PROMPTLY_S

    message = await wait_for_final_message()
    assert message.status == Message.Status.STOPPED
    assert message.text.startswith("".join(seen))
    assert len(message.text) < len(full)
    assert message.finish_reason == "stopped"
    assert message.tokens == len(message.text.split())


@live
async def test_client_disconnect_while_the_llm_hangs(live_server_url, http, fake_llm):
    """Leaving before the first token closes the upstream request too, and saves an empty stopped answer."""
    await add_corpus()
    resp = await http.get(f"{live_server_url}/rag/stream", params={"question": "pgvector? fault=hang"})
    try:
        result = Streamed(status=resp.status, headers=resp.headers, body=b"")
        async for chunk in resp.content.iter_any():
            if any(e.type == "sources" for e in result.feed(chunk)):
                break
        # The request reached the fake before we leave, so that leaving is what ends it.
        await asyncio.to_thread(wait_until, lambda: fake_llm.records, timeout=3, what="the chat request")
        close_time = time.monotonic()
    finally:
        resp.close()
    record = await asyncio.to_thread(fake_llm.wait_for_close, timeout=3)
    assert record.closed_by_client
    assert record.ended_at - close_time < PROMPTLY_S
    message = await wait_for_final_message()
    assert message.status == Message.Status.STOPPED
    assert message.text == ""


# --- heartbeat -----------------------------------------------------------------------------------


@live
async def test_heartbeats_while_waiting_for_the_first_token(live_server_url, http, fake_llm):
    await add_corpus()
    fake_llm.first_token_ms = 700  # the live server beats every 0.2 s
    result = await stream(http, live_server_url, {"question": "pgvector?"})
    assert result.status == 200
    first_token = next(
        i for i, item in enumerate(result.timeline) if isinstance(item, Event) and item.type == "message"
    )
    before = result.timeline[:first_token]
    assert before[0] == OPENING
    heartbeats = [item for item in before if isinstance(item, str) and item != OPENING]
    assert len(heartbeats) >= 1
    assert set(heartbeats) == {" keep-alive"}
    assert tokens_text(result.events) == ["Hello", " world", "!", "[DONE]"]


# --- bad input -----------------------------------------------------------------------------------


def error_of(response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    payload = json.loads(response.content)
    assert isinstance(payload, dict) and isinstance(payload.get("error"), str), payload
    assert payload["error"].strip()
    return payload["error"]


@pytest.fixture
def client() -> AsyncClient:
    # Report a 500 as a response, so a test shows the status rather than the exception.
    return AsyncClient(raise_request_exception=False)


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


# --- upstream failures through HTTP --------------------------------------------------------------


@live
@pytest.mark.parametrize(
    ("fault", "code"),
    [*CHAT_FAULT_CODES, ("embed500", "upstream_error")],
)
@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_upstream_failure_is_an_error_event_then_the_end(live_server_url, http, fake_llm, fault, code, fmt):
    await add_corpus()
    started = time.monotonic()
    result = await stream(http, live_server_url, {"question": f"What does pgvector add? fault={fault}", "format": fmt})
    elapsed = time.monotonic() - started

    assert result.status == 200
    types = [e.type for e in result.events]
    assert types[-2] == "error", types
    if fmt == "json":
        assert types[-1] == "done"
    else:
        assert types[-1] == "message" and result.events[-1].data == "[DONE]"
    assert types.count("error") == 1 and "metrics" not in types
    error = json.loads(result.events[-2].data)
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"].strip()
    # It says which server failed, not where it is: the address is for the server's log.
    assert "server" in error["message"] and fake_llm.base_url not in error["message"]
    log = next(p for p in processes.STARTED if p.url == live_server_url).log().splitlines()
    assert any("Answering" in line and fake_llm.base_url in line for line in log)
    if fault in {"http500", "embed500"}:
        assert "500" in error["message"]
    if fault == "embed500":
        assert "embedding server" in error["message"]
        assert "sources" not in types and fake_llm.records == []
    else:
        assert types[0] == "sources"
    if fault == "hang":
        assert settings.RAG_LLM_TIMEOUT <= elapsed < settings.RAG_LLM_TIMEOUT + 3
    else:
        assert elapsed < 5
    message = await Message.objects.aget(pk=error["message_id"])
    assert message.status == Message.Status.ERROR
    assert message.error == error["message"]
    if fault == "drop_after=2":
        assert message.text == "Hello world"  # the partial answer is kept


@live
async def test_upstream_fault_set_on_the_server_applies_too(live_server_url, http, fake_llm):
    # No documents needed: with an empty knowledge base the question still reaches the LLM.
    fake_llm.fault = "http500"
    result = await stream(http, live_server_url, {"question": "anything"})
    types = [e.type for e in result.events]
    assert types[-2:] == ["error", "message"]
    assert json.loads(result.events[-2].data)["code"] == "upstream_error"
    assert fake_llm.records and fake_llm.records[-1].fault == "http500"


# --- POST /rag/query -----------------------------------------------------------------------------


async def post_query(http: aiohttp.ClientSession, base: str, body: object) -> tuple[int, dict]:
    async with http.post(f"{base}/rag/query", json=body) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        return resp.status, await resp.json()


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


@live
async def test_concurrent_streams_are_independent(live_server_url, http, fake_llm):
    await add_corpus()
    fake_llm.tokens = [f"w{i} " for i in range(8)]
    fake_llm.inter_token_ms = 20
    questions = [f"question number {i} about pgvector" for i in range(6)]
    results = await asyncio.gather(*(stream(http, live_server_url, {"question": q}) for q in questions))
    for result in results:
        assert result.status == 200
        assert [e.type for e in result.events][-2] == "metrics"
        assert tokens_text(result.events) == [*fake_llm.tokens, "[DONE]"]
    ids = {json.loads(r.events[-2].data)["message_id"] for r in results}
    assert len(ids) == len(questions)
    saved = [m async for m in Message.objects.filter(pk__in=ids)]
    assert all(m.status == Message.Status.COMPLETE and m.text == "".join(fake_llm.tokens) for m in saved)


# --- collections: who may read what ----------------------------------------------------------------


@sync_to_async
def restricted_setup() -> dict[str, str]:
    """A public and a group-only collection; session cookies for an outsider and a member."""
    from django.contrib.auth.models import Group, User
    from django.test import Client

    from rag.models import Collection

    members = Group.objects.create(name="members")
    Collection.objects.create(name="public")
    secret = Collection.objects.create(name="secret", visibility=Collection.Visibility.GROUPS)
    secret.groups.add(members)
    Collection.objects.create(name="staffonly", visibility=Collection.Visibility.STAFF)
    cookies = {}
    for name, groups, staff in [("outsider", [], False), ("member", [members], False), ("staffer", [], True)]:
        user = User.objects.create_user(username=name, password="pw", is_staff=staff)
        user.groups.set(groups)
        client = Client()
        client.force_login(user)
        cookies[name] = client.cookies[settings.SESSION_COOKIE_NAME].value
    return cookies


async def add_to(collection: str, text: str) -> None:
    from rag.models import Collection
    from rag.services.documents import DocumentInput, aadd_documents

    await aadd_documents(
        documents=[DocumentInput(text=text)], collection=await Collection.objects.aget(name=collection)
    )


def cookie(session: str | None) -> dict[str, str]:
    return {"Cookie": f"{settings.SESSION_COOKIE_NAME}={session}"} if session else {}


@live
@pytest.mark.parametrize(
    ("who", "sees"),
    [
        (None, {"public"}),
        ("outsider", {"public"}),
        ("member", {"public", "secret"}),
        ("staffer", {"public", "staffonly"}),
    ],
)
async def test_stream_and_query_only_search_collections_the_user_may_read(live_server_url, http, fake_llm, who, sees):
    cookies = await restricted_setup()
    await add_to("public", "The shop opens at nine in the morning.")
    await add_to("secret", "The vault code is 4711 and opens the vault.")
    await add_to("staffonly", "The staff room code is 0815 and opens the staff room.")
    texts = {"public": "shop opens", "secret": "vault code", "staffonly": "staff room code"}
    headers = cookie(cookies.get(who))

    result = await stream(http, live_server_url, {"question": "what code opens it?", "k": "5"}, headers=headers)
    [sources] = [json.loads(e.data) for e in result.events if e.type == "sources"]
    snippets = " ".join(s["snippet"] for s in sources)
    assert {name for name, text in texts.items() if text in snippets} == sees
    # Nothing unreadable reached the model's prompt either.
    prompt = json.dumps(fake_llm.records[-1].request["messages"])
    for name, text in texts.items():
        assert (text in prompt) == (name in sees)

    async with http.post(
        f"{live_server_url}/rag/query", json={"question": "what code opens it?", "k": 5}, headers=headers
    ) as resp:
        body = await resp.json()
    assert resp.status == 200
    snippets = " ".join(s["snippet"] for s in body["sources"])
    assert {name for name, text in texts.items() if text in snippets} == sees


@live
async def test_naming_a_collection_narrows_the_search_but_never_widens_it(live_server_url, http, fake_llm):
    cookies = await restricted_setup()
    await add_to("public", "The shop opens at nine in the morning.")
    await add_to("secret", "The vault code is 4711 and opens the vault.")
    params = {"question": "what opens?", "k": "5", "collection": "secret"}
    # Not readable and not there read the same: a 404 that says what to do, never an empty answer.
    for name in ("secret", "nope"):
        async with http.get(
            f"{live_server_url}/rag/stream", params={**params, "collection": name}, headers=cookie(cookies["outsider"])
        ) as refused:
            error = (await refused.json())["error"]
        assert refused.status == 404 and f"no collection named '{name}' that you may read" in error
    async with http.get(f"{live_server_url}/rag/stream", params={**params, "collection": "a\x00b"}) as nul:
        assert nul.status == 400 and "no NUL" in (await nul.json())["error"]
    async with http.post(
        f"{live_server_url}/rag/query", json={"question": "what opens?", "collection": "nope"}, headers=cookie(None)
    ) as query:
        assert query.status == 404 and "no collection named 'nope'" in (await query.json())["error"]
    member = await stream(http, live_server_url, params, headers=cookie(cookies["member"]))
    [sources] = [json.loads(e.data) for e in member.events if e.type == "sources"]
    assert [s["snippet"] for s in sources] == ["The vault code is 4711 and opens the vault."]


async def test_query_collection_must_be_a_name(client):
    response = await client.post("/rag/query", {"question": "q", "collection": 3}, content_type="application/json")
    assert "'collection' must be the name" in error_of(response, 400)


# --- resuming with Last-Event-ID, detach, stop -------------------------------------------------


async def read_tokens_then_leave(http, base: str, params: dict[str, str], *, tokens: int) -> list[Event]:
    """Read a /rag/stream until ``tokens`` tokens came, then drop the connection."""
    parser, events = SSEParser(), []
    async with http.get(f"{base}/rag/stream", params=params) as resp:
        async for chunk in resp.content.iter_any():
            events += parser.feed(chunk)
            if len([e for e in events if e.type == "message"]) >= tokens:
                return events
    raise AssertionError(f"the stream ended before {tokens} tokens: {events}")


def json_tokens(events: list[Event]) -> list[str]:
    return [json.loads(e.data)["token"] for e in events if e.type == "message"]


@live
async def test_a_detached_answer_goes_on_without_its_client_and_resumes_on_the_same_url(
    live_server_url, http, fake_llm
):
    fake_llm.tokens = [f"w{i} " for i in range(30)]
    fake_llm.inter_token_ms = 20
    params = {"question": "pgvector?", "format": "json", "detach": "1"}
    first = await read_tokens_then_leave(http, live_server_url, params, tokens=3)

    # What an EventSource does when its connection drops: the same URL, with Last-Event-ID.
    rest = await stream(http, live_server_url, params, headers={"Last-Event-ID": first[-1].id})

    assert json_tokens(first) + json_tokens(rest.events) == fake_llm.tokens  # no gap, no duplicate
    assert rest.events[-1].type == "done"
    [request] = [r for r in fake_llm.records if r.stream]  # asked once: the reconnect never generated
    assert not request.closed_by_client
    assert (await wait_for_final_message()).status == Message.Status.COMPLETE


@live
async def test_without_detach_a_client_that_leaves_stops_the_answer_and_a_resume_gets_its_end(
    live_server_url, http, fake_llm
):
    fake_llm.tokens = [f"w{i} " for i in range(100)]
    fake_llm.inter_token_ms = 20
    params = {"question": "pgvector?", "format": "json"}
    first = await read_tokens_then_leave(http, live_server_url, params, tokens=3)
    record = await asyncio.to_thread(fake_llm.wait_for_close, timeout=5)
    assert record.closed_by_client  # the upstream request closed at once
    saved = await wait_for_final_message()
    assert saved.status == Message.Status.STOPPED

    rest = await stream(http, live_server_url, params, headers={"Last-Event-ID": first[-1].id})

    assert len([r for r in fake_llm.records if r.stream]) == 1
    assert "".join(json_tokens(first) + json_tokens(rest.events)) == saved.text
    assert [e.type for e in rest.events][-2:] == ["metrics", "done"]
    assert json.loads(rest.events[-2].data)["status"] == "stopped"
    # After the very last event there is nothing more: 204 tells an EventSource to stop reconnecting.
    async with http.get(
        f"{live_server_url}/rag/stream", params=params, headers={"Last-Event-ID": rest.events[-1].id}
    ) as resp:
        assert resp.status == 204


@live
@pytest.mark.parametrize(
    ("last_event_id", "status", "says"),
    [
        ("42", 400, "Last-Event-ID must be the id of the last event"),
        ("not-an-id.3", 400, "Last-Event-ID must be the id of the last event"),
        ("6f1c0d1e-0000-4000-8000-000000000000.3", 404, "No answer of yours"),
    ],
)
async def test_a_last_event_id_that_is_not_one_of_ours_is_refused_and_generates_nothing(
    live_server_url, http, fake_llm, last_event_id, status, says
):
    async with http.get(
        f"{live_server_url}/rag/stream", params={"question": "pgvector?"}, headers={"Last-Event-ID": last_event_id}
    ) as resp:
        assert resp.status == status
        assert says in (await resp.json())["error"]
    assert fake_llm.records == []


@live
async def test_an_api_client_stops_its_detached_answer(live_server_url, http, fake_llm):
    fake_llm.tokens = [f"w{i} " for i in range(100)]
    fake_llm.inter_token_ms = 20
    first = await read_tokens_then_leave(
        http, live_server_url, {"question": "pgvector?", "format": "json", "detach": "1"}, tokens=2
    )
    key = first[-1].id.split(".")[0]

    async with http.post(f"{live_server_url}/rag/answers/{key}/stop") as resp:
        assert resp.status == 200 and await resp.json() == {"stopped": True}
    record = await asyncio.to_thread(fake_llm.wait_for_close, timeout=5)
    assert record.closed_by_client and record.tokens_sent < 100
    assert (await wait_for_final_message()).status == Message.Status.STOPPED
    async with http.post(f"{live_server_url}/rag/answers/{key}/stop") as resp:
        assert await resp.json() == {"stopped": False}  # it had ended
    async with http.post(f"{live_server_url}/rag/answers/6f1c0d1e-0000-4000-8000-000000000000/stop") as resp:
        assert resp.status == 404


@live
async def test_detach_must_be_0_or_1(live_server_url, http, fake_llm):
    async with http.get(f"{live_server_url}/rag/stream", params={"question": "q", "detach": "yes"}) as resp:
        assert resp.status == 400 and "'detach' must be 0 or 1" in (await resp.json())["error"]


# --- requests from other sites ----------------------------------------------------------------


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


# --- metadata filters ---------------------------------------------------------------------------


async def add_with_metadata(text: str, metadata: dict) -> None:
    from rag.services.documents import DocumentInput, aadd_documents

    await aadd_documents(documents=[DocumentInput(text=text, metadata=metadata)])


@live
async def test_a_metadata_filter_narrows_stream_and_query(live_server_url, http, fake_llm):
    await add_with_metadata("The 2021 guide says the shop opens at nine.", {"year": 2021, "tags": ["guide"]})
    await add_with_metadata("The 2024 guide says the shop opens at ten.", {"year": 2024, "tags": ["guide", "new"]})
    await add_with_metadata("A note without a year says the shop opens at noon.", {})
    question = "when does the shop open?"

    result = await stream(
        http, live_server_url, {"question": question, "k": "5", "filter": json.dumps({"year": {"gte": 2022}})}
    )
    [sources] = [json.loads(e.data) for e in result.events if e.type == "sources"]
    assert [s["snippet"] for s in sources] == ["The 2024 guide says the shop opens at ten."]

    body = {"question": question, "k": 5, "filter": {"tags": {"in": ["guide"]}}}
    async with http.post(f"{live_server_url}/rag/query", json=body) as resp:
        found = {s["snippet"] for s in (await resp.json())["sources"]}
    assert resp.status == 200
    assert found == {"The 2021 guide says the shop opens at nine.", "The 2024 guide says the shop opens at ten."}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"year": {"after": 2020}}', "Unknown operator 'after' on 'year'"),
        ("{year: 2020}", "The filter is not valid JSON"),
        ('["year"]', "The filter must be a JSON object"),
    ],
)
async def test_a_bad_filter_is_a_400_that_says_how_to_write_it(client, bad, message):
    response = await client.get("/rag/stream", {"question": "q", "filter": bad})
    assert message in error_of(response, 400)
    response = await client.post(
        "/rag/query",
        {"question": "q", "filter": json.loads(bad) if bad.startswith(("[", '{"')) else bad},
        content_type="application/json",
    )
    assert message in error_of(response, 400)
