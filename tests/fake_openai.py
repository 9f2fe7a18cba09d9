"""A fake OpenAI-compatible server on real loopback HTTP, for tests and benchmarks.

It runs its own event loop in a daemon thread, so sync and async tests can both talk to it with
real clients. Its main job besides serving tokens is to record, per chat stream, whether and when
the client went away, which is how tests prove that cancellation reaches the upstream request.

Run on its own (the benchmark does), it serves in the foreground until SIGTERM or SIGINT::

    python -m tests.fake_openai --port 8011 --first-token-ms 200 --inter-token-ms 20 --tokens 50

Besides the OpenAI routes it then answers ``GET /_records`` (one JSON object per chat request:
tokens sent, how and when it ended, the tail of its question) and ``POST /_reset`` (forget them).
Times are ``time.monotonic()`` seconds, which on Linux is one clock for every process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import hashlib
import json
import math
import os
import re
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

__all__ = ["FakeOpenAI", "StreamRecord", "embed_text", "main"]

DEFAULT_TOKENS = ("Hello", " world", "!")
# "fault=" must not follow a word character, so that e.g. "default=x" is not a marker.
_MARKER = re.compile(r"(?<!\w)fault=([a-z0-9_]+)(?:=(\d+))?")
_WORD = re.compile(r"\w+")
_CHAT_FAULTS = {"http500", "http429", "hang", "drop_after", "malformed_after", "length"}
_EMBED_FAULTS = {"embed500", "embed_hang"}
_CHUNK_ID = "chatcmpl-fake"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
QUESTION_TAIL = 80  # characters of the last user message kept in /_records, enough for a "rid=" marker


#: Chat faults of this fake and the error code the app reports for each.
CHAT_FAULT_CODES = [
    ("http500", "upstream_error"),
    ("http429", "rate_limited"),
    ("hang", "timeout"),
    ("drop_after=2", "bad_stream"),
    ("malformed_after=1", "bad_stream"),
]


@dataclass
class StreamRecord:
    request: dict[str, Any]
    stream: bool
    started_at: float
    fault: str | None = None
    tokens_sent: int = 0
    finished: bool = False
    closed_by_client: bool = False
    ended_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def _end(self, *, closed_by_client: bool = False) -> None:
        if self.ended_at is None:
            self.ended_at = time.monotonic()
            self.closed_by_client = closed_by_client
            self.done.set()

    def summary(self, index: int) -> dict[str, Any]:
        """What ``GET /_records`` reports about this request."""
        return {
            "index": index,
            "stream": self.stream,
            "fault": self.fault,
            "tokens_sent": self.tokens_sent,
            "finished": self.finished,
            "closed_by_client": self.closed_by_client,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "question": _last_user_text(self.request)[-QUESTION_TAIL:],
        }


@dataclass
class _Plan:
    """What one chat request gets: the configuration as it was when the request arrived."""

    model: str
    tokens: list[str]
    raw_json: bool
    first_s: float
    inter_s: float
    finish_reason: str
    fault: str
    arg: int | None
    hold_after: int | None


def embed_text(text: str, dimensions: int) -> list[float]:
    """Normalized bag-of-words vector: texts sharing words get a high cosine similarity."""
    vec = [0.0] * dimensions
    for word in _WORD.findall(text.lower()):
        # blake2b, not hash(): the vector must not change with PYTHONHASHSEED between runs.
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        vec[int.from_bytes(digest, "big") % dimensions] += 1.0
    norm = math.sqrt(sum(v * v for v in vec))
    if norm == 0.0:
        vec[0] = 1.0
        return vec
    return [v / norm for v in vec]


def _split(spec: str) -> tuple[str, int | None]:
    name, _, arg = spec.partition("=")
    return name, int(arg) if arg.isdigit() else None


def _pick_fault(texts: list[str], server_fault: str | None, allowed: set[str]) -> str | None:
    """The fault spec (e.g. "drop_after=2") for one request: its own marker wins over the server's."""
    for text in texts:
        for match in _MARKER.finditer(text):
            if match.group(1) in allowed:
                return match.group(0).removeprefix("fault=")
    if server_fault and _split(server_fault)[0] in allowed:
        return server_fault
    return None


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # multi-part content: only the text parts can carry a marker
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


def _model(body: dict[str, Any]) -> str:
    return str(body.get("model") or "fake-model")


def _error(status: int, message: str, type_: str, code: str | None, **headers: str) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


# Control characters that llama.cpp's server sends raw inside JSON strings, and that a
# reader splitting lines like str.splitlines() mistakes for line ends. CR and LF stay escaped:
# raw, they would end the SSE line for any reader.
_RAW_CONTROLS = "\x0b\x0c\x1c\x1d\x1e"


@functools.lru_cache(maxsize=4096)
def _token_chunk(model: str, token: str, raw: bool = False) -> bytes:
    # The same few chunks go out thousands of times under load: encode each once.
    return _chunk(model, {"content": token}, raw=raw)


def _chunk(model: str, delta: dict[str, str], finish_reason: str | None = None, *, raw: bool = False) -> bytes:
    payload = {
        "id": _CHUNK_ID,
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if not raw:
        return b"data: " + json.dumps(payload).encode() + b"\n\n"
    # As llama.cpp's server writes it: non-ASCII (U+2028, NEL...) and controls unescaped.
    text = json.dumps(payload, ensure_ascii=False)
    for control in _RAW_CONTROLS:
        text = text.replace(json.dumps(control)[1:-1], control)
    return b"data: " + text.encode() + b"\n\n"


class FakeOpenAI:
    # Plain attributes that tests set between requests; reset() restores them.
    tokens: list[str]
    #: Send non-ASCII and control characters raw inside the JSON, as llama.cpp's server does.
    raw_json: bool
    first_token_ms: float
    inter_token_ms: float
    fault: str | None
    finish_reason: str
    #: Streams stop after this many tokens until release(): an answer that is still being
    #: written for as long as a test needs, however slow the machine.
    hold_after: int | None

    def __init__(self, *, dimensions: int = 64) -> None:
        self.dimensions = dimensions
        self.port: int | None = None
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.records: list[StreamRecord] = []
        self.embedding_requests: list[list[str]] = []
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.tokens = list(DEFAULT_TOKENS)
            self.raw_json = False
            self.first_token_ms = 0.0
            self.inter_token_ms = 0.0
            self.fault = None
            self.finish_reason = "stop"
            self.hold_after = None
            self._released = asyncio.Event()
        self.clear_records()

    def release(self) -> None:
        """Let the streams held at ``hold_after`` (and any later ones) go on."""
        assert self._loop is not None, "the fake is not started"
        self._loop.call_soon_threadsafe(self._released.set)

    def clear_records(self) -> None:
        """Forget the requests seen so far, keeping the configuration (``POST /_reset``)."""
        with self._lock:
            self.records.clear()
            self.embedding_requests.clear()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    ) -> None:
        """Serve on ``host:port`` (0: any free port, then read ``self.port``) from a daemon thread."""
        loop = loop_factory()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fake-openai", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(host, port), loop).result(timeout=10)

    async def _serve(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/_records", self._records)
        app.router.add_post("/_reset", self._reset)
        # Without handler_cancellation (off by default in aiohttp 3.9+) a handler sleeping between
        # tokens would only learn that the client left at its next write.
        # A short shutdown_timeout keeps stop() quick when a "hang" request is still open.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = self._runner = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait_for_close(self, index: int = -1, timeout: float = 5.0) -> StreamRecord:
        """Block until chat request ``index`` has ended (finished, or left by the client)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            # The request may not have reached the server yet.
            needed = index + 1 if index >= 0 else -index
            if not self._arrived.wait_for(lambda: len(self.records) >= needed, timeout):
                raise TimeoutError(f"chat request {index} never arrived")
            record = self.records[index]
        if not record.done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"chat request {index} still open after {timeout}s")
        return record

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        with self._lock:
            fault = _pick_fault([_last_user_text(body)], self.fault, _CHAT_FAULTS)
            name, arg = _split(fault or "")
            plan = _Plan(
                model=_model(body),
                tokens=list(self.tokens),
                raw_json=self.raw_json,
                first_s=self.first_token_ms / 1000,
                inter_s=self.inter_token_ms / 1000,
                finish_reason="length" if name == "length" else self.finish_reason,
                fault=name,
                arg=arg,
                hold_after=self.hold_after,
            )
            record = StreamRecord(
                request=body, stream=bool(body.get("stream")), started_at=time.monotonic(), fault=fault
            )
            self.records.append(record)
            self._arrived.notify_all()
        try:
            if name == "http500":
                return _error(500, "The server had an error (fake fault=http500)", "server_error", None)
            if name == "http429":
                msg = "Rate limit reached (fake fault=http429)"
                return _error(429, msg, "requests", "rate_limit_exceeded", **{"retry-after": "0"})
            if record.stream:
                return await self._stream(request, record, plan)
            return await self._complete(request, record, plan)
        except asyncio.CancelledError:
            # With handler_cancellation, this is how aiohttp tells us the peer went away.
            record._end(closed_by_client=True)
            raise
        finally:
            record._end()

    async def _stream(self, request: web.Request, record: StreamRecord, plan: _Plan) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        start = loop.time()
        response = web.StreamResponse(headers=_SSE_HEADERS)
        try:
            # Inside the try: a client that leaves before the headers are out (Stop pressed as
            # the request was sent) makes prepare() fail like any later write.
            await response.prepare(request)
            if plan.fault == "hang":
                await asyncio.Event().wait()  # until aiohttp cancels us because the client left
            await response.write(_chunk(plan.model, {"role": "assistant", "content": ""}))
            # One step past the last token, so that faults with K >= len(tokens) still apply.
            for i in range(len(plan.tokens) + 1):
                if plan.fault == "drop_after" and i == plan.arg:
                    return self._drop(request, record)
                if plan.fault == "malformed_after" and i == plan.arg:
                    await response.write(b'data: {"id":"chatcmpl-fake","object":"chat.comp\n\n')
                if i == len(plan.tokens):
                    break
                if i == plan.hold_after:
                    await self._released.wait()
                    start = loop.time() - plan.first_s - i * plan.inter_s  # the rest keeps its pace
                # Token i is due at an absolute time, so that the time spent writing (which grows
                # with the number of open streams) does not add up into a drifting schedule.
                await asyncio.sleep(max(0.0, start + plan.first_s + i * plan.inter_s - loop.time()))
                # write() drains the transport itself (aiohttp deprecates a separate drain()), so each
                # chunk is on the wire before the next sleep.
                await response.write(_token_chunk(plan.model, plan.tokens[i], plan.raw_json))
                record.tokens_sent += 1
            if plan.fault == "drop_after":
                return self._drop(request, record)
            await response.write(_chunk(plan.model, {}, plan.finish_reason))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:
            # A write hit the closed socket (aiohttp's ClientConnectionResetError is a
            # ConnectionResetError). Returning, not raising, spares aiohttp logging it as a 500.
            record._end(closed_by_client=True)
            return response
        record.finished = True
        return response

    async def _complete(self, request: web.Request, record: StreamRecord, plan: _Plan) -> web.StreamResponse:
        if plan.fault == "hang":
            await asyncio.Event().wait()
        await asyncio.sleep(plan.first_s + plan.inter_s * max(0, len(plan.tokens) - 1))
        if plan.fault == "drop_after":
            return self._drop(request, record)
        messages = record.request.get("messages") or []
        prompt_tokens = sum(len(_WORD.findall(str(m.get("content", "")))) for m in messages)
        message = {"role": "assistant", "content": "".join(plan.tokens)}
        completion = {
            "id": _CHUNK_ID,
            "object": "chat.completion",
            "created": 0,
            "model": plan.model,
            "choices": [{"index": 0, "message": message, "finish_reason": plan.finish_reason}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(plan.tokens),
                "total_tokens": prompt_tokens + len(plan.tokens),
            },
        }
        text = json.dumps(completion)
        if plan.fault == "malformed_after":
            text = text[: len(text) // 2]
        record.tokens_sent = len(plan.tokens)
        record.finished = True
        return web.Response(text=text, content_type="application/json")

    @staticmethod
    def _drop(request: web.Request, record: StreamRecord) -> web.StreamResponse:
        # Closing the transport sends a FIN without the chunked terminator, so the client sees a
        # truncated body. The record ends first: the cancellation that follows is ours, not the client's.
        record._end()
        if request.transport is not None:
            request.transport.close()
        return web.StreamResponse()

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        raw = body.get("input")
        texts = [str(t) for t in raw] if isinstance(raw, list) else [str(raw)]
        with self._lock:
            self.embedding_requests.append(texts)
            fault = _pick_fault(texts, self.fault, _EMBED_FAULTS)
        if fault == "embed_hang":
            await asyncio.Event().wait()  # until the client leaves (a worker killed mid-run, say)
        if fault is not None:
            return _error(500, "The server had an error (fake fault=embed500)", "server_error", None)
        dimensions = int(body.get("dimensions") or self.dimensions)
        data: list[dict[str, Any]] = []
        for i, text in enumerate(texts):
            vector: list[float] | str = embed_text(text, dimensions)
            if body.get("encoding_format") == "base64":
                vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        n_words = sum(len(_WORD.findall(t)) for t in texts)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": _model(body),
                "usage": {"prompt_tokens": n_words, "total_tokens": n_words},
            }
        )

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}
        return web.json_response({"object": "list", "data": [model]})

    async def _records(self, request: web.Request) -> web.Response:
        with self._lock:
            records = list(self.records)
        return web.json_response([record.summary(i) for i, record in enumerate(records)])

    async def _reset(self, request: web.Request) -> web.Response:
        self.clear_records()
        return web.json_response({"status": "ok"})


def _fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when it is installed (it is, with uvicorn[standard]): the fake must not be the bottleneck."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.fake_openai``: serve in the foreground until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m tests.fake_openai", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="default 0: any free port (printed at startup)")
    parser.add_argument("--first-token-ms", type=float, default=200.0, help="delay from request to first token")
    parser.add_argument("--inter-token-ms", type=float, default=20.0, help="delay between tokens")
    parser.add_argument("--tokens", type=int, default=50, help='tokens per answer: " tok0", " tok1", ...')
    parser.add_argument("--dimensions", type=int, default=64, help="embedding size when a request names none")
    parser.add_argument("--fault", default=None, help="server-wide fault, e.g. http500 or drop_after=3")
    args = parser.parse_args(argv)

    fake = FakeOpenAI(dimensions=args.dimensions)
    fake.tokens = [f" tok{i}" for i in range(args.tokens)]
    fake.first_token_ms = args.first_token_ms
    fake.inter_token_ms = args.inter_token_ms
    fake.fault = args.fault
    # Blocked here, so that the server thread inherits the mask and the main thread alone takes them.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    fake.start(host=args.host, port=args.port, loop_factory=_fast_loop_factory())
    print(f"fake OpenAI server on {fake.base_url} (pid {os.getpid()})", flush=True)
    try:
        received = signal.sigwait(stop_signals)
        print(f"fake OpenAI server stopping ({signal.Signals(received).name})", file=sys.stderr, flush=True)
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
