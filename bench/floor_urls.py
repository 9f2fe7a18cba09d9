"""The floors of ``bench/floor_bench.py``: streams that do less than ``/rag/stream``, served by
the same process, so that a run says what each layer of an answer costs at 1,000 streams.

Each view speaks the app's text format (unnamed ``data:`` tokens, then ``data: [DONE]``):

* ``/_floor/bare``: no LLM and no database, 50 tokens 20 ms apart after 200 ms, like the
  fake LLM. What daphne (or uvicorn), Django and the middleware cost for a stream.
* ``/_floor/aiohttp``: the fake LLM's stream relayed through a plain aiohttp session and
  ``json.loads`` per chunk. Adds an upstream HTTP stream.
* ``/_floor/client``: the same relayed through the app's chat provider (the ``openai`` client).
  Adds the client. ``/rag/stream`` adds the embedding, the search and the event log to this.

And ``/_floor/gc``, what Python's garbage collector has cost the process, read before and
after each level.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import json
import time
from collections.abc import AsyncIterator

import aiohttp
from django.conf import settings
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.urls import include, path

OPEN, DONE = b": stream open\n\n", b"data: [DONE]\n\n"
_sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}


@atexit.register
def _close_sessions() -> None:
    """On the server's stopped loop, as rag.providers.openai_compat does for its clients: or
    aiohttp logs "Unclosed client session" at every shutdown."""
    for loop, session in _sessions.items():
        if not loop.is_running() and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.run_until_complete(session.close())


def _stream(tokens: AsyncIterator[str]) -> StreamingHttpResponse:
    async def body() -> AsyncIterator[bytes]:
        yield OPEN
        async for token in tokens:
            yield f"data: {token}\n\n".encode()
        yield DONE

    return StreamingHttpResponse(body(), content_type="text/event-stream")


async def bare(request: HttpRequest) -> StreamingHttpResponse:
    async def tokens() -> AsyncIterator[str]:
        # Due at fixed times from the start, as an LLM produces them: a late write does not
        # delay the tokens after it.
        start = asyncio.get_running_loop().time()
        for n in range(50):
            await asyncio.sleep(start + 0.2 + n * 0.02 - asyncio.get_running_loop().time())
            yield f"t{n}"

    return _stream(tokens())


def _messages(request: HttpRequest) -> list[dict[str, str]]:
    return [{"role": "user", "content": request.GET.get("question", "")}]


async def relay_aiohttp(request: HttpRequest) -> StreamingHttpResponse:
    loop = asyncio.get_running_loop()
    if loop not in _sessions:
        _sessions[loop] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    body = {"model": settings.RAG_CHAT_MODEL, "messages": _messages(request), "max_tokens": 512, "stream": True}
    headers = {"Authorization": f"Bearer {settings.OPENAI_API_KEY}"}

    async def tokens() -> AsyncIterator[str]:
        url = f"{settings.OPENAI_BASE_URL}/chat/completions"
        async with _sessions[loop].post(url, json=body, headers=headers) as response:
            async for line in response.content:
                data = line[5:].strip() if line.startswith(b"data:") else b""
                if not data or data == b"[DONE]":
                    continue
                for choice in json.loads(data)["choices"]:
                    if text := choice["delta"].get("content"):
                        yield text

    return _stream(tokens())


async def relay_client(request: HttpRequest) -> StreamingHttpResponse:
    from rag.providers import chat_provider

    async def tokens() -> AsyncIterator[str]:
        async for chunk in chat_provider().stream(_messages(request), max_tokens=512, temperature=0.0):
            if chunk.text:
                yield chunk.text

    return _stream(tokens())


class _Collections:
    """What Python's garbage collector has cost this process: its seconds and collections so
    far, and its longest pause (every thread waits for a collection) since the last read."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.count = 0
        self.longest = 0.0
        self._began = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        pause = time.perf_counter() - self._began
        self.seconds += pause
        self.count += 1
        self.longest = max(self.longest, pause)


_collections = _Collections()
gc.callbacks.append(_collections)


async def collections(request: HttpRequest) -> JsonResponse:
    """``/_floor/gc``: the collector's cost so far (a read starts the next longest pause)."""
    body = {
        "seconds": _collections.seconds,
        "collections": _collections.count,
        "longest_pause_s": _collections.longest,
        "threshold": gc.get_threshold(),
    }
    _collections.longest = 0.0
    return JsonResponse(body)


urlpatterns = [
    path("_floor/bare", bare),
    path("_floor/aiohttp", relay_aiohttp),
    path("_floor/client", relay_client),
    path("_floor/gc", collections),
    path("", include("ragsite.urls")),
]
