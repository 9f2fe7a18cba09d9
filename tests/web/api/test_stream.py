"""GET /rag/stream: headers and event order, tokens exactly as the LLM sent them, a client
that leaves, heartbeats, upstream failures, streams side by side."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from django.conf import settings

from rag.models import Message
from tests import processes
from tests.conftest import wait_until
from tests.factories import add_corpus
from tests.fake_openai import CHAT_FAULT_CODES
from tests.sse import Event
from tests.web.api.helpers import (
    OPENING,
    PROMPTLY_S,
    Streamed,
    assert_only_the_servers_ids,
    live,
    normalized,
    stream,
    tokens_text,
    wait_for_final_message,
)
from tests.web.test_sse import TRICKY_TOKENS, as_sse_sees_it

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


# --- several at once -----------------------------------------------------------------------------


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
