"""A fake OpenAI-compatible server on real loopback HTTP, for tests.

It runs its own event loop in a daemon thread, so sync and async tests can both talk to it with
real clients. Its main job besides serving tokens is to record, per chat stream, whether and when
the client went away, which is how tests prove that cancellation reaches the upstream request.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

__all__ = ["FakeOpenAI", "StreamRecord", "embed_text"]

DEFAULT_TOKENS = ("Hello", " world", "!")
# "fault=" must not follow a word character, so that e.g. "default=x" is not a marker.
_MARKER = re.compile(r"(?<!\w)fault=([a-z0-9_]+)(?:=(\d+))?")
_WORD = re.compile(r"\w+")
_CHAT_FAULTS = {"http500", "http429", "hang", "drop_after", "malformed_after", "length"}
_EMBED_FAULTS = {"embed500"}
_CHUNK_ID = "chatcmpl-fake"


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


def _find_fault(texts: list[str], allowed: set[str]) -> tuple[str, int | None] | None:
    for text in texts:
        for name, arg in _MARKER.findall(text):
            if name in allowed:
                return name, int(arg) if arg else None
    return None


def _parse_fault(spec: str | None, allowed: set[str]) -> tuple[str, int | None] | None:
    if not spec:
        return None
    name, _, arg = spec.partition("=")
    if name not in allowed:
        return None
    return name, int(arg) if arg.isdigit() else None


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


def _chunk(model: str, delta: dict[str, str], finish_reason: str | None = None) -> bytes:
    payload = {
        "id": _CHUNK_ID,
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class FakeOpenAI:
    # Plain attributes that tests set between requests; reset() restores them.
    tokens: list[str]
    first_token_ms: float
    inter_token_ms: float
    fault: str | None
    finish_reason: str

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
            self.first_token_ms = 0.0
            self.inter_token_ms = 0.0
            self.fault = None
            self.finish_reason = "stop"
            self.records.clear()
            self.embedding_requests.clear()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fake-openai", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), loop).result(timeout=10)

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        # Without handler_cancellation (off by default since aiohttp 3.8) a handler sleeping between
        # tokens would only learn that the client left at its next write.
        # A short shutdown_timeout keeps stop() quick when a "hang" request is still open.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
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
        stream = bool(body.get("stream"))
        with self._lock:
            tokens, finish_reason = list(self.tokens), self.finish_reason
            first_s, inter_s = self.first_token_ms / 1000, self.inter_token_ms / 1000
            fault = _find_fault([_last_user_text(body)], _CHAT_FAULTS) or _parse_fault(self.fault, _CHAT_FAULTS)
            record = StreamRecord(request=body, stream=stream, started_at=time.monotonic())
            record.fault = None if fault is None else fault[0] + ("" if fault[1] is None else f"={fault[1]}")
            self.records.append(record)
            self._arrived.notify_all()
        name, arg = fault if fault else ("", None)
        if name == "length":
            finish_reason = "length"
        try:
            if name == "http500":
                return _error(500, "The server had an error (fake fault=http500)", "server_error", None)
            if name == "http429":
                msg = "Rate limit reached (fake fault=http429)"
                return _error(429, msg, "requests", "rate_limit_exceeded", **{"retry-after": "0"})
            if stream:
                return await self._stream(request, record, tokens, first_s, inter_s, finish_reason, name, arg)
            return await self._complete(request, record, tokens, first_s, inter_s, finish_reason, name, arg)
        except (asyncio.CancelledError, ConnectionError):
            # CancelledError: aiohttp cancelled us because the peer left; ConnectionError
            # (including aiohttp's ClientConnectionResetError): a write hit the closed socket.
            record._end(closed_by_client=True)
            raise
        finally:
            record._end()

    async def _stream(
        self,
        request: web.Request,
        record: StreamRecord,
        tokens: list[str],
        first_s: float,
        inter_s: float,
        finish_reason: str,
        fault: str,
        arg: int | None,
    ) -> web.StreamResponse:
        model = _model(record.request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        if fault == "hang":
            await asyncio.Event().wait()  # until aiohttp cancels us when the client leaves
        await self._send(response, _chunk(model, {"role": "assistant", "content": ""}))
        for i in range(len(tokens) + 1):
            if fault == "drop_after" and i == arg:
                return self._drop(request, record)
            if fault == "malformed_after" and i == arg:
                await self._send(response, b'data: {"id":"chatcmpl-fake","object":"chat.comp\n\n')
            if i == len(tokens):
                break
            await asyncio.sleep(first_s if i == 0 else inter_s)
            await self._send(response, _chunk(model, {"content": tokens[i]}))
            record.tokens_sent += 1
        if fault == "drop_after":
            return self._drop(request, record)  # K >= len(tokens): still no proper ending
        await self._send(response, _chunk(model, {}, finish_reason))
        await self._send(response, b"data: [DONE]\n\n")
        await response.write_eof()
        record.finished = True
        return response

    async def _complete(
        self,
        request: web.Request,
        record: StreamRecord,
        tokens: list[str],
        first_s: float,
        inter_s: float,
        finish_reason: str,
        fault: str,
        arg: int | None,
    ) -> web.StreamResponse:
        if fault == "hang":
            await asyncio.Event().wait()
        await asyncio.sleep(first_s + inter_s * max(0, len(tokens) - 1))
        if fault == "drop_after":
            return self._drop(request, record)
        prompt_tokens = sum(len(_WORD.findall(str(m.get("content", "")))) for m in record.request["messages"])
        completion = {
            "id": _CHUNK_ID,
            "object": "chat.completion",
            "created": 0,
            "model": _model(record.request),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(tokens)},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            },
        }
        text = json.dumps(completion)
        if fault == "malformed_after":
            text = text[: len(text) // 2]
        record.tokens_sent = len(tokens)
        record.finished = True
        return web.Response(text=text, content_type="application/json")

    @staticmethod
    async def _send(response: web.StreamResponse, data: bytes) -> None:
        # write() drains the transport itself (a separate drain() is deprecated in aiohttp 3.x), so
        # each chunk is on the wire before the next sleep.
        await response.write(data)

    @staticmethod
    def _drop(request: web.Request, record: StreamRecord) -> web.StreamResponse:
        # Closing the transport sends a FIN without the chunked terminator, so the client sees a
        # truncated body; the record ends here and the cancellation that follows is ours, not the client's.
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
            fault = _find_fault(texts, _EMBED_FAULTS) or _parse_fault(self.fault, _EMBED_FAULTS)
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
