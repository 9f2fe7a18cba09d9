"""Tests for the test-support modules themselves: the SSE parser and the fake OpenAI server.

Nothing here needs Django; run with ``-p no:django``.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest

from tests.fake_openai import FakeOpenAI, embed_text
from tests.sse import Event, SSEParser, parse_sse

#: How soon the upstream must see a client that left: at once, but a busy 2-core machine may
#: take a few hundred ms to schedule it; the rest of the answer would take a second or more.
PROMPTLY_S = 0.5

# --- SSE parser ---------------------------------------------------------------------------------


def feed_all(chunks: list[bytes | str]) -> tuple[SSEParser, list[Event]]:
    parser = SSEParser()
    events: list[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return parser, events


def test_basic_event_and_defaults() -> None:
    assert parse_sse("data: hello\n\n") == [Event(type="message", data="hello", id=None)]


def test_crlf_split_across_feeds_counts_once() -> None:
    # Were the split CRLF counted twice, the "\n" would be an empty line and dispatch "a" alone.
    parser, events = feed_all([b"data: a\r", b"\ndata: b\r", b"\n"])
    assert events == []
    assert parser.feed(b"\r") == [Event("message", "a\nb", None)]
    # The LF completing that CR is swallowed, the next one is a real (empty) line again.
    assert parser.feed(b"\n") == []
    assert parser.feed(b"data: c\n\n") == [Event("message", "c", None)]


def test_cr_only_and_mixed_line_ends() -> None:
    body = "data: a\rdata: b\r\rdata: c\r\n\r\ndata: d\n\n"
    assert [e.data for e in parse_sse(body)] == ["a\nb", "c", "d"]


def test_byte_by_byte_equals_whole_body() -> None:
    body = "\ufeffevent: x\r\ndata: 😀 日本\rid: 7\r\n\r\n: note\ndata:  two\n\n".encode()
    _, events = feed_all([body[i : i + 1] for i in range(len(body))])
    assert events == parse_sse(body)
    assert events == [Event("x", "😀 日本", "7"), Event("message", " two", "7")]


def test_bom_only_stripped_once_at_start() -> None:
    assert parse_sse("\ufeffdata: x\n\n") == [Event("message", "x", None)]
    # A second BOM makes the field name "\ufeffdata", which is ignored.
    assert parse_sse("\ufeff\ufeffdata: x\n\n") == []
    # A BOM split across feeds is still the stream-leading one.
    bom = "\ufeff".encode()
    _, events = feed_all([bom[:1], bom[1:], b"data: y\n\n"])
    assert events == [Event("message", "y", None)]
    assert parse_sse("data: \ufeffz\n\n")[0].data == "\ufeffz"


def test_comments_and_no_data_event() -> None:
    parser = SSEParser()
    assert parser.feed(": hello\n:\n\nevent: foo\n\n") == []
    assert parser.comments == [" hello", ""]
    # The type of the event that was not dispatched must not leak into the next one.
    assert parser.feed("data: x\n\n") == [Event("message", "x", None)]


def test_field_parsing_rules() -> None:
    body = "data:  two spaces\ndata:nospace\ndata\ndata: \nfoo: ignored\n\n"
    assert parse_sse(body) == [Event("message", " two spaces\nnospace\n\n", None)]
    assert parse_sse("data\n\n") == [Event("message", "", None)]
    assert parse_sse("data: a:b: c\n\n")[0].data == "a:b: c"


def test_unicode_line_separators_kept_verbatim() -> None:
    tricky = "a\u2028b\x85c\vd\fe\x1cf\x1dg\x1eh\u2029i"
    assert parse_sse(f"data: {tricky}\n\n".encode()) == [Event("message", tricky, None)]


def test_id_persists_and_nul_id_ignored() -> None:
    events = parse_sse("id: 1\ndata: a\n\ndata: b\n\nid: x\0y\ndata: c\n\nid\ndata: d\n\n")
    assert [e.id for e in events] == ["1", "1", "1", ""]


def test_retry_only_ascii_digits() -> None:
    parser = SSEParser()
    parser.feed("retry: 1500\n\n")
    assert parser.retry == 1500
    parser.feed("retry: 12a\nretry: ²\nretry: \n\n")
    assert parser.retry == 1500


def test_unfinished_event_not_dispatched_and_invalid_utf8() -> None:
    assert parse_sse("data: x\n") == []
    assert parse_sse("data: x") == []
    assert parse_sse(b"data: \xff\n\n")[0].data == "\ufffd"


# --- fake OpenAI server -------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeOpenAI) -> FakeOpenAI:
    server.reset()
    return server


@pytest.fixture
def client(fake: FakeOpenAI) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0) as c:
        yield c


def raw_chat(fake: FakeOpenAI, **body: Any) -> bytes:
    body = {"model": "m", "messages": USER, **body}
    req = urllib.request.Request(
        f"{fake.base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.read()


def test_stream_tokens(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="m", messages=USER, stream=True))
    assert [c.choices[0].delta.content for c in chunks] == ["", "Hello", " world", "!", None]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert {c.model for c in chunks} == {"m"}
    record = fake.wait_for_close()
    assert record.finished and not record.closed_by_client
    assert record.tokens_sent == 3 and record.stream and record.request["messages"] == USER


def test_stream_wire_format(fake: FakeOpenAI) -> None:
    fake.tokens = ["a\nb", "data: x"]
    events = parse_sse(raw_chat(fake, stream=True))
    assert events[-1].data == "[DONE]"
    payloads = [json.loads(e.data) for e in events[:-1]]
    assert [p["choices"][0]["delta"].get("content") for p in payloads] == ["", "a\nb", "data: x", None]
    assert payloads[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}


def test_non_stream_completion(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.tokens = ["x", "y", "z", "w"]
    fake.finish_reason = "content_filter"
    resp = client.chat.completions.create(model="m", messages=USER)
    assert resp.choices[0].message.content == "xyzw"
    assert resp.choices[0].finish_reason == "content_filter"
    assert resp.usage is not None and resp.usage.completion_tokens == 4
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 4
    assert not fake.wait_for_close().stream


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["fake-model"]


def test_embeddings(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    texts = ["The cat sat", "the CAT sat on a mat", "quantum chromodynamics", ""]
    vectors = [d.embedding for d in client.embeddings.create(model="e", input=texts).data]
    # The client asks for base64 (float32) by default, hence the tolerances.
    assert all(len(v) == 64 and math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-6) for v in vectors)
    # Deterministic, and blind to case and punctuation.
    assert vectors[0] == pytest.approx(embed_text("the cat SAT!", 64), abs=1e-6)
    cos = [sum(a * b for a, b in zip(vectors[0], v, strict=True)) for v in vectors[1:3]]
    assert cos[0] > 0.6 > cos[1]
    assert vectors[3] == [1.0] + [0.0] * 63
    one = client.embeddings.create(model="e", input="solo", dimensions=8, encoding_format="float").data
    assert len(one) == 1 and one[0].embedding == embed_text("solo", 8)
    assert fake.embedding_requests == [texts, ["solo"]]


def test_reset_and_wait_timeout(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.tokens, fake.fault = ["z"], "http500"
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=USER)
    fake.reset()
    assert fake.records == [] and fake.fault is None and fake.tokens == ["Hello", " world", "!"]
    with pytest.raises(TimeoutError):
        fake.wait_for_close(timeout=0.05)


@pytest.mark.parametrize("stream", [False, True])
def test_http500(fake: FakeOpenAI, client: openai.OpenAI, stream: bool) -> None:
    fake.fault = "http500"
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m", messages=USER, stream=stream)
    assert info.value.status_code == 500
    assert info.value.body == {
        "message": "The server had an error (fake fault=http500)",
        "type": "server_error",
        "param": None,
        "code": None,
    }


def test_http429_by_marker(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "please fault=http429 now"}]
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="m", messages=messages, stream=True)
    assert info.value.response.headers["retry-after"] == "0"
    assert info.value.code == "rate_limit_exceeded"
    assert fake.wait_for_close().fault == "http429"


def test_marker_rules(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.fault = "http500"
    # The request's marker wins over the server-wide fault.
    resp = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "fault=length"}])
    assert resp.choices[0].finish_reason == "length"
    fake.fault = None
    # Only the last user message counts, and "default=http500" is not a marker.
    messages = [
        {"role": "user", "content": "fault=http500"},
        {"role": "assistant", "content": "fault=http500"},
        {"role": "user", "content": "default=http500"},
    ]
    assert client.chat.completions.create(model="m", messages=messages).choices[0].finish_reason == "stop"


def test_embed500_only_affects_embeddings(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.fault = "embed500"
    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(model="e", input="x")
    assert client.chat.completions.create(model="m", messages=USER).choices[0].message.content
    fake.fault = "http500"
    assert client.embeddings.create(model="e", input="x").data
    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(model="e", input=["ok", "bad fault=embed500"])


def test_drop_after(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.tokens = ["a", "b", "c", "d"]
    fake.fault = "drop_after=2"
    got: list[str | None] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(model="m", messages=USER, stream=True):
            got.append(chunk.choices[0].delta.content)
    assert got == ["", "a", "b"]
    record = fake.wait_for_close()
    assert record.tokens_sent == 2 and not record.finished and not record.closed_by_client


def test_malformed_after(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.fault = "malformed_after=1"
    events = parse_sse(raw_chat(fake, stream=True))
    assert events[2].data == '{"id":"chatcmpl-fake","object":"chat.comp'
    assert [json.loads(e.data)["choices"][0]["delta"].get("content") for e in events[3:-1]] == [
        " world",
        "!",
        None,
    ]
    assert events[-1].data == "[DONE]" and fake.wait_for_close().finished
    with pytest.raises(json.JSONDecodeError):
        list(client.chat.completions.create(model="m", messages=USER, stream=True))


def test_hang_noticed_when_client_gives_up(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.fault = "hang"
    with pytest.raises(openai.APITimeoutError):
        list(client.chat.completions.create(model="m", messages=USER, stream=True, timeout=0.2))
    record = fake.wait_for_close(timeout=2)
    assert record.closed_by_client and record.tokens_sent == 0


def test_client_disconnect_detected_promptly(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.tokens = [f"t{i}" for i in range(20)]
    fake.inter_token_ms = 50
    stream = client.chat.completions.create(model="m", messages=USER, stream=True)
    chunks = iter(stream)
    assert [next(chunks).choices[0].delta.content for _ in range(3)] == ["", "t0", "t1"]
    close_time = time.monotonic()
    stream.close()
    # The handler is asleep between tokens here, so only handler cancellation can notice this fast.
    record = fake.wait_for_close(timeout=2)
    assert record.closed_by_client and not record.finished
    assert record.ended_at is not None and record.ended_at - close_time < PROMPTLY_S
    assert record.tokens_sent == 2


@pytest.mark.asyncio
async def test_async_client_disconnect_during_long_sleep(fake: FakeOpenAI) -> None:
    # With a 1 s gap between tokens, only handler cancellation (not a failed write) can notice in time.
    fake.tokens = ["x"] * 20
    fake.inter_token_ms = 1000
    body = {"model": "m", "stream": True, "messages": USER}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{fake.base_url}/chat/completions", json=body)
        parser = SSEParser()
        events: list[Event] = []
        async for data in resp.content.iter_any():
            events += parser.feed(data)
            if len(events) >= 2:  # the role chunk and the first token
                break
        close_time = time.monotonic()
        resp.close()
    record = fake.wait_for_close(timeout=2)
    assert record.closed_by_client and record.tokens_sent == 1
    assert record.ended_at is not None and record.ended_at - close_time < PROMPTLY_S


# --- server logs in failure reports -------------------------------------------------------------


def test_a_failing_test_shows_what_the_server_processes_logged_while_it_ran(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from tests import conftest, processes

    log = tmp_path / "web.log"
    log.write_text("an earlier test's requests\n")
    web = processes.Process(name="web", proc=SimpleNamespace(pid=4242), port=0, log_path=log)
    monkeypatch.setattr(processes, "STARTED", [web])  # not the servers other tests started
    item = SimpleNamespace(rag_log_starts={log: log.stat().st_size})
    log.write_text("an earlier test's requests\nTraceback: the error behind the failure\n")
    reports = {
        outcome: SimpleNamespace(when="call", failed=outcome == "failed", sections=[])
        for outcome in ("failed", "passed")
    }
    for report in reports.values():
        hook = conftest.pytest_runtest_makereport(item, None)
        next(hook)
        with pytest.raises(StopIteration):
            hook.send(SimpleNamespace(get_result=lambda report=report: report))
    assert reports["failed"].sections == [("web (pid 4242) logged", "Traceback: the error behind the failure\n")]
    assert reports["passed"].sections == []
