"""Unit tests of rag.web.sse: framing of awkward tokens, the event stream, and its heartbeat wrapper.

Every framed token is read back with tests.sse, a parser that follows the WHATWG rules, so the
assertions say what a browser's EventSource would really see.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from rag.answers.events import LogEvent
from rag.services import answering
from rag.services.retrieval import Source
from rag.web import sse
from tests.garbage import cyclic_garbage, of_type
from tests.sse import Event, SSEParser, parse_sse

KEY = "6f1c0d1e-0000-4000-8000-000000000000"


def logged(kind: str, data: object, seq: int = 1) -> LogEvent:
    """An event of answer 7's log, as the transports get it."""
    return LogEvent(7, KEY, seq, kind, data)


def token(text: str, seq: int = 1) -> LogEvent:
    return logged("token", text, seq)


# Tokens an LLM can emit that a naive SSE framing gets wrong. Never "": the service does not
# emit empty tokens.
TRICKY_TOKENS: list[str] = [
    "\n",
    "\n\n",
    "line1\nline2",
    "\r\n",
    "\r",
    "a\rb",
    "crlf\r\n\r\nend",
    " world",
    "  two",
    " ",
    "\t tab",
    "data: x",
    "data:x",
    ": comment",
    ":",
    "event: foo",
    "event: foo\ndata: bar",
    "id: 5",
    "\nid: 6\n",
    "retry: 10",
    "\nretry: 1\n",
    "[DONE]",
    "\n\ndata: [DONE]\n\n",
    "😀",
    "🇯🇵",
    "👨\u200d👩\u200d👧",
    "日本語",
    "e\u0301",
    "مرحبا",
    "שלום",
    "\u202eabc\u202c",
    "\v",
    "\f",
    "\x1c\x1d\x1e",
    "\x85",
    "\u2028",
    "\u2029",
    "x\ufeffy",
    "\x00",
    "<script>alert(1)</script>",
    "&amp;",
    '{"json": "looking"}',
    "null",
    "back\\slash",
    "\\n",
    "\"quotes'",
    "x" * 2000,
]

_SSE_LINE_BREAK = re.compile(r"\r\n|\r")


def as_sse_sees_it(token: str) -> str:
    """The token as an SSE client gets it back: CRLF and CR become LF, nothing else changes."""
    return _SSE_LINE_BREAK.sub("\n", token)


def token_id(token: str) -> str:
    return ascii(token)[:40]


def make_source(n: int = 1) -> Source:
    return Source(
        n=n,
        chunk_id=10 + n,
        document_id=100 + n,
        title=f"Doc {n} \u2028 <b>",
        source="path/x.md",
        heading="A > B",
        text="line one\r\nline two\n\n" + "long " * 100,
        score=0.876543,
    )


def make_metrics() -> answering.Metrics:
    return answering.Metrics(
        message_id=7,
        conversation_id="c0ffee",
        status="complete",
        model="m",
        embedding_model="e",
        retrieval_ms=1.5,
        ttft_ms=2.5,
        total_ms=9.0,
        tokens=3,
        tokens_per_s=400.0,
        gap_p50_ms=2.25,
        gap_p95_ms=2.75,
        gap_max_ms=2.75,
        finish_reason="stop",
    )


# --- frame() / encode() -------------------------------------------------------------------------


def test_tricky_list_has_no_empty_token_and_no_duplicates():
    assert "" not in TRICKY_TOKENS
    assert len(set(TRICKY_TOKENS)) == len(TRICKY_TOKENS)


@pytest.mark.parametrize("token", TRICKY_TOKENS, ids=token_id)
def test_frame_text_token_is_one_unnamed_event_with_the_token_as_data(token):
    raw = sse.frame(token)
    assert isinstance(raw, bytes)
    assert raw.endswith(b"\n\n")
    parser = SSEParser()
    events = parser.feed(raw)
    assert events == [Event(type="message", data=as_sse_sees_it(token), id=None)]
    # Nothing in the token text may act as a field of its own.
    assert parser.retry is None
    assert parser.last_event_id is None
    assert parser.comments == []


@pytest.mark.parametrize("token", TRICKY_TOKENS, ids=token_id)
def test_encode_text_token_matches_frame(token):
    raw = sse.encode(logged("token", token), fmt="text")
    assert raw == sse.frame(token, id=f"{KEY}.1")
    [event] = parse_sse(raw)
    assert event.type == "message"
    assert event.data == as_sse_sees_it(token)
    assert event.id == f"{KEY}.1"


@pytest.mark.parametrize("token", TRICKY_TOKENS, ids=token_id)
def test_encode_json_token_round_trips_exactly(token):
    raw = sse.encode(logged("token", token), fmt="json")
    parser = SSEParser()
    [event] = parser.feed(raw)
    assert event.type == "message"
    assert event.id == f"{KEY}.1"
    assert json.loads(event.data) == {"token": token}
    assert json.loads(event.data)["token"] == token
    assert parser.retry is None and parser.comments == []


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_all_tricky_tokens_in_one_stream_fed_byte_by_byte(fmt):
    """Framed back to back and split at every byte (inside multi-byte characters and between CR
    and LF), the stream still gives one event per token, in order."""
    body = b"".join(sse.encode(token(t, seq=n), fmt=fmt) for n, t in enumerate(TRICKY_TOKENS, start=1))
    parser = SSEParser()
    events: list[Event] = []
    for i in range(len(body)):
        events += parser.feed(body[i : i + 1])
    assert len(events) == len(TRICKY_TOKENS)
    if fmt == "text":
        assert [e.data for e in events] == [as_sse_sees_it(t) for t in TRICKY_TOKENS]
    else:
        assert [json.loads(e.data)["token"] for e in events] == TRICKY_TOKENS
    assert {e.type for e in events} == {"message"}
    # Only the server's own ids: no token's text set one.
    assert [e.id for e in events] == [f"{KEY}.{n}" for n in range(1, len(TRICKY_TOKENS) + 1)]
    assert parser.retry is None and parser.comments == []


def test_only_the_lone_done_token_looks_like_the_end_marker_in_text_format():
    """The documented limit of the seed protocol: a token that is exactly "[DONE]" is
    indistinguishable from the end marker in ``text`` format, and only that token."""
    [end] = parse_sse(sse.end("text"))
    lookalikes = [t for t in TRICKY_TOKENS if parse_sse(sse.frame(t))[0] == end]
    assert lookalikes == ["[DONE]"]
    # In json format no token can look like the end.
    [json_end] = parse_sse(sse.end("json"))
    for t in TRICKY_TOKENS:
        [event] = parse_sse(sse.encode(token(t), fmt="json"))
        assert (event.type, event.data) != (json_end.type, json_end.data)


@pytest.mark.parametrize("name", ["sources", "error", "metrics", "done", "weird name"])
@pytest.mark.parametrize("data", ["x", "a\nb", "a\r\nb", ""])
def test_frame_named_event(name, data):
    [event] = parse_sse(sse.frame(data, name))
    assert event.type == name
    assert event.data == as_sse_sees_it(data)


def test_frame_empty_data_is_still_an_event():
    # A field "data" with an empty value still dispatches (data buffer is "\n" before trimming).
    assert parse_sse(sse.frame("")) == [Event(type="message", data="", id=None)]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_encode_sources_is_a_json_list_of_public_sources(fmt):
    sources = [make_source(1), make_source(2)]
    [event] = parse_sse(sse.encode(logged("sources", [s.public() for s in sources]), fmt=fmt))
    assert event.type == "sources"
    payload = json.loads(event.data)
    assert payload == [s.public() for s in sources]
    assert {"id", "title", "snippet", "score"} <= set(payload[0])
    assert payload[0]["title"] == "Doc 1 \u2028 <b>"
    assert payload[0]["score"] == 0.8765


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_encode_metrics(fmt):
    metrics = make_metrics()
    [event] = parse_sse(sse.encode(logged("metrics", metrics.as_dict()), fmt=fmt))
    assert event.type == "metrics"
    assert json.loads(event.data) == metrics.as_dict()


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("message", ["The LLM server at http://x failed", "two\nlines\r\nand CR\r", "[DONE]"])
def test_encode_error(fmt, message):
    error = {"message": message, "code": "timeout", "message_id": 3}
    [event] = parse_sse(sse.encode(logged("error", error), fmt=fmt))
    assert event.type == "error"
    assert json.loads(event.data) == {"message": message, "code": "timeout", "message_id": 3}


def test_encode_rejects_other_kinds():
    with pytest.raises(TypeError):
        sse.encode(logged("weird", "x"), fmt="text")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_done_event_is_the_formats_end_marker_with_its_id(fmt):
    [event] = parse_sse(sse.encode(logged("done", {"status": "complete"}, seq=9), fmt=fmt))
    [end] = parse_sse(sse.end(fmt))
    assert (event.type, event.data, event.id) == (end.type, end.data, f"{KEY}.9")


def test_end_markers():
    assert parse_sse(sse.end("text")) == [Event(type="message", data="[DONE]", id=None)]
    [done] = parse_sse(sse.end("json"))
    assert done.type == "done"
    assert json.loads(done.data) == {"done": True}


def test_opening_and_heartbeat_are_comments():
    parser = SSEParser()
    assert parser.feed(sse.OPENING + sse.HEARTBEAT) == []
    assert parser.comments == [" stream open", " keep-alive"]


# --- event_stream() ------------------------------------------------------------------------------


async def events_from(items: list[object], *, fail: Exception | None = None) -> AsyncIterator[object]:
    for item in items:
        yield item
    if fail is not None:
        raise fail


async def collect(stream: AsyncIterator[bytes]) -> tuple[SSEParser, list[Event]]:
    parser = SSEParser()
    events: list[Event] = []
    async for chunk in stream:
        events += parser.feed(chunk)
    return parser, events


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_event_stream_order_and_end(fmt):
    items = [
        logged("sources", [make_source().public()], 1),
        token("a\r\nb", 2),
        token("[DONE]", 3),
        logged("metrics", make_metrics().as_dict(), 4),
        logged("done", {"status": "complete"}, 5),
    ]
    parser, events = await collect(sse.event_stream(events_from(items), fmt=fmt, heartbeat=30))
    assert parser.comments == [" stream open"]
    assert [e.type for e in events] == [
        "sources",
        "message",
        "message",
        "metrics",
        "done" if fmt == "json" else "message",
    ]
    if fmt == "json":
        assert [json.loads(e.data)["token"] for e in events[1:3]] == ["a\r\nb", "[DONE]"]
    else:
        assert [e.data for e in events[1:]][:2] == ["a\nb", "[DONE]"]
        assert events[-1].data == "[DONE]"


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_event_stream_turns_an_exception_into_an_error_event_then_ends(fmt):
    source = events_from([token("partial")], fail=RuntimeError("boom"))
    _, events = await collect(sse.event_stream(source, fmt=fmt, heartbeat=30))
    assert [e.type for e in events][-2:] == ["error", "done" if fmt == "json" else "message"]
    error = json.loads(events[-2].data)
    assert error["code"] == "internal"
    assert "RuntimeError" in error["message"]
    assert "boom" not in error["message"]  # internals are not leaked to the client


async def test_event_stream_sends_heartbeats_while_the_source_is_quiet():
    gate = asyncio.Event()

    async def source():
        yield token("first", 1)
        await gate.wait()
        yield token("second", 2)

    stream = sse.event_stream(source(), fmt="text", heartbeat=0.02)
    async with aclosing(stream):
        assert await anext(stream) == sse.OPENING
        assert parse_sse(await anext(stream))[0].data == "first"
        assert await asyncio.wait_for(anext(stream), 5) == sse.HEARTBEAT
        gate.set()
        rest = [chunk async for chunk in stream]
    assert rest[-1] == sse.DONE
    assert [c for c in rest[:-1] if c != sse.HEARTBEAT] == [sse.frame("second", id=f"{KEY}.2")]


async def test_event_stream_closed_early_closes_the_source():
    unwound = asyncio.Event()

    async def source():
        try:
            yield token("first")
            await asyncio.Event().wait()
        finally:
            unwound.set()

    stream = sse.event_stream(source(), fmt="text", heartbeat=30)
    assert await anext(stream) == sse.OPENING
    assert await anext(stream) == sse.frame("first", id=f"{KEY}.1")
    await stream.aclose()
    assert unwound.is_set()
    assert pump_tasks() == []


# --- ready_batches(): the heartbeat wrapper ---------------------------------------------------------


def pump_tasks() -> list[asyncio.Task]:
    """ready_batches' pump tasks still running: none may outlive the consumer."""
    return [
        t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "ready_batches.<locals>.pump" and not t.done()
    ]


async def flatten(batches: AsyncIterator[list[object]]) -> list[object]:
    return [item async for batch in batches for item in batch]


async def test_ready_batches_passes_a_fast_source_through_in_one_batch():
    """Items that are all ready when the consumer looks come as one list, in order, with no heartbeat."""

    async def source():
        for i in range(5):
            yield i

    assert [b async for b in sse.ready_batches(source(), heartbeat=30)] == [[0, 1, 2, 3, 4]]
    assert pump_tasks() == []


async def test_ready_batches_leaves_no_cycle_for_the_collector():
    async def source():
        yield 1

    with cyclic_garbage() as garbage:
        assert [b async for b in sse.ready_batches(source(), heartbeat=30)] == [[1]]
    # The heartbeat sets its next timer itself: a cycle, which would keep the stream's queue
    # and its context (the request in it) until a full collection.
    assert of_type(garbage, "ready_batches.<locals>.beat") == []
    assert of_type(garbage, "Queue") == []


async def test_ready_batches_keeps_order_across_batches():
    steps = [asyncio.Event() for _ in range(3)]

    async def source():
        for i, step in enumerate(steps):
            await step.wait()
            yield i

    batches = sse.ready_batches(source(), heartbeat=30)
    async with aclosing(batches):
        for i, step in enumerate(steps):
            step.set()
            assert await asyncio.wait_for(anext(batches), 5) == [i]
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(batches), 5)


async def test_ready_batches_yields_empty_heartbeats_while_a_slow_source_waits():
    gate = asyncio.Event()
    log: list[str] = []

    async def source():
        try:
            yield "first"
            log.append("waiting")
            await gate.wait()
            yield "second"
        finally:
            log.append("finally")

    batches = sse.ready_batches(source(), heartbeat=0.02)
    async with aclosing(batches):
        assert await asyncio.wait_for(anext(batches), 5) == ["first"]
        # The gate is shut, so only heartbeats can come, and they keep coming.
        for _ in range(3):
            assert await asyncio.wait_for(anext(batches), 5) == []
        assert log == ["waiting"]
        gate.set()
        rest = [b async for b in batches]
    assert rest[-1] == ["second"]
    assert all(b == [] for b in rest[:-1])
    assert log == ["waiting", "finally"]
    assert pump_tasks() == []


async def test_ready_batches_first_heartbeat_waits_a_full_interval_of_quiet():
    gate = asyncio.Event()

    async def source():
        yield "now"
        await gate.wait()

    loop = asyncio.get_running_loop()
    batches = sse.ready_batches(source(), heartbeat=0.05)
    async with aclosing(batches):
        start = loop.time()
        assert await anext(batches) == ["now"]
        assert await asyncio.wait_for(anext(batches), 5) == []
        assert loop.time() - start >= 0.05
        gate.set()


async def test_ready_batches_reraises_the_source_error_after_the_items_before_it():
    async def source():
        yield 1
        yield 2
        raise ValueError("bad source")

    got: list[object] = []
    with pytest.raises(ValueError, match="bad source"):
        async for batch in sse.ready_batches(source(), heartbeat=30):
            got += batch
    assert got == [1, 2]
    assert pump_tasks() == []


async def test_ready_batches_closing_the_consumer_unwinds_the_source():
    entered = asyncio.Event()
    seen: list[str] = []

    async def source():
        try:
            yield "first"
            entered.set()
            await asyncio.Event().wait()  # would wait forever
            yield "never"
        except BaseException as exc:
            seen.append(type(exc).__name__)
            raise
        finally:
            seen.append("finally")

    batches = sse.ready_batches(source(), heartbeat=0.02)
    assert await anext(batches) == ["first"]
    await asyncio.wait_for(entered.wait(), 5)
    assert await asyncio.wait_for(anext(batches), 5) == []  # a heartbeat while it waits
    await batches.aclose()
    assert seen == ["CancelledError", "finally"]
    assert pump_tasks() == []


async def test_ready_batches_cancelling_the_consumer_task_unwinds_the_source():
    """What Django does when the client disconnects: cancel the task iterating the response."""
    unwound = asyncio.Event()
    got_first = asyncio.Event()

    async def source():
        try:
            yield "first"
            await asyncio.Event().wait()
        finally:
            unwound.set()

    async def consume():
        async for batch in sse.ready_batches(source(), heartbeat=30):
            if batch == ["first"]:
                got_first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert unwound.is_set()
    assert pump_tasks() == []


async def test_ready_batches_source_sees_the_consumer_context():
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("request-1")

    async def source():
        yield var.get()

    assert await flatten(sse.ready_batches(source(), heartbeat=30)) == ["request-1"]
