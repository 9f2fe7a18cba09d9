"""Server-Sent Events framing for answer events.

Two formats share one event order (sources, tokens, metrics | error, end):

``text`` (default, compatible with the seed tutorial's ``EventSource`` client):
    each token is an unnamed event whose data is the token itself. A token
    holding line breaks is sent as several ``data:`` lines, which the client
    joins with LF, so ``event.data`` equals the token, except that SSE turns
    CR and CRLF into LF. The stream ends with ``data: [DONE]``; a token that
    is exactly ``[DONE]`` is therefore indistinguishable from the end marker
    for a seed-style client (a limit of that protocol; use ``json``).

``json``:
    every event's data is JSON (``{"token": "..."}``), so every character of
    every token survives, CR and ``[DONE]`` included; the stream ends with
    ``event: done``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress
from typing import TypeVar

from django.http import HttpRequest

from rag.answers import events
from rag.answers.events import LogEvent

T = TypeVar("T")

_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # exactly SSE's line terminators, unlike str.splitlines()

DONE = b"data: [DONE]\n\n"
HEARTBEAT = b": keep-alive\n\n"
# Sent at once so that clients and proxies see the response start immediately.
OPENING = b": stream open\n\n"


def last_event_id(request: HttpRequest) -> str | None:
    """Where a client resumes a stream: the ``Last-Event-ID`` its EventSource sends when it
    reconnects by itself, else ``?last_event_id=``, for a new EventSource (one the browser
    gave up on), which cannot send the header."""
    return request.headers.get("Last-Event-ID") or request.GET.get("last_event_id") or None


def frame(data: str, event: str | None = None, *, id: str | None = None) -> bytes:
    """One SSE event. ``id`` (an answer's ``<answer id>.<seq>``) is what a reconnecting
    EventSource sends back as ``Last-Event-ID``."""
    head = (f"id: {id}\n" if id else "") + (f"event: {event}\n" if event else "")
    lines = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    return f"{head}{lines}\n".encode()


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def end(fmt: str, *, id: str | None = None) -> bytes:
    if fmt == "json":
        return frame(_json({"done": True}), "done", id=id)
    return frame("[DONE]", id=id)


def encode(event: LogEvent, *, fmt: str) -> bytes:
    """An event of an answer's log, with its id; ``done`` is the format's end marker."""
    match event.kind:
        case events.TOKEN:
            return frame(_json({"token": event.data}) if fmt == "json" else event.data, id=event.id)
        case events.SOURCES | events.METRICS | events.ERROR:
            return frame(_json(event.data), event.kind, id=event.id)
        case events.DONE:
            return end(fmt, id=event.id)
    raise TypeError(f"not an answer event: {event!r}")


async def event_stream(source: AsyncIterator[LogEvent], *, fmt: str, heartbeat: float) -> AsyncIterator[bytes]:
    """The answer API's event stream: ``frames`` in the text or JSON format, every event with
    its id (a client that reconnects with ``Last-Event-ID`` gets exactly the events after
    it), ending with the format's end marker.

    However the source ends (normally, by an exception), the client gets an end marker,
    never a silently truncated stream.
    """
    ended = False

    async def encode_event(event: LogEvent) -> bytes:
        nonlocal ended
        ended = ended or event.terminal
        return encode(event, fmt=fmt)

    def failure(exc: Exception) -> bytes:
        return frame(_json({"message": f"The answer failed: {type(exc).__name__}.", "code": "internal"}), "error")

    async with aclosing(frames(source, encode=encode_event, failure=failure, heartbeat=heartbeat)) as chunks:
        async for chunk in chunks:
            yield chunk
    if not ended:
        yield end(fmt)


async def frames(
    events: AsyncIterator[T],
    *,
    encode: Callable[[T], Awaitable[bytes]],
    failure: Callable[[Exception], bytes],
    heartbeat: float,
) -> AsyncIterator[bytes]:
    """SSE bytes for ``events``: an opening comment, the events encoded in
    batches of whatever is ready, heartbeat comments while the source is quiet,
    and ``failure(exc)`` if the source raises. Shared by every SSE transport."""
    yield OPENING
    # Closing order matters: the batches (and the task feeding them) stop
    # first, then the source, which is then no longer running.
    async with aclosing(events), aclosing(ready_batches(events, heartbeat=heartbeat)) as batches:
        try:
            async for batch in batches:
                yield b"".join([await encode(event) for event in batch]) if batch else HEARTBEAT
        except Exception as exc:  # the services report expected failures as events; this is a bug
            yield failure(exc)


async def ready_batches(source: AsyncIterator[T], *, heartbeat: float) -> AsyncIterator[list[T]]:
    """Yield the items of ``source`` in lists of whatever is ready, and an empty
    list whenever ``heartbeat`` seconds pass without an item.

    The source runs in its own task feeding a queue. When the server is busy,
    tokens pile up while the previous write is in flight and go out together in
    one write, so the cost per token falls as load rises. A heartbeat costs a
    timer, not a task per item. The task inherits this context (and so Django's
    per-request thread for ORM calls).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
    last_put = loop.time()

    def put(kind: str, value: object = None) -> None:
        nonlocal last_put
        last_put = loop.time()
        queue.put_nowait((kind, value))

    def beat() -> None:
        nonlocal timer
        quiet = loop.time() - last_put
        if quiet >= heartbeat:
            put("beat")
            quiet = 0.0
        timer = loop.call_later(heartbeat - quiet, beat)

    async def pump() -> None:
        try:
            async for item in source:
                put("item", item)
        except Exception as exc:  # handed to the consumer, raised there
            put("error", exc)
        else:
            put("end")

    task = asyncio.create_task(pump())
    timer = loop.call_later(heartbeat, beat)
    try:
        while True:
            kind, value = await queue.get()
            batch: list[T] = []
            while kind == "item":
                batch.append(value)  # type: ignore[arg-type]
                if queue.empty():
                    break
                kind, value = queue.get_nowait()
            if batch:
                yield batch
            if kind == "beat" and not batch:
                yield []
            elif kind == "error":
                raise value  # type: ignore[misc]
            elif kind == "end":
                return
    finally:
        timer.cancel()
        # ``beat`` refers to itself (it sets the next timer): a reference cycle that would keep
        # this stream's state, the queue and the timer's context with the request in it,
        # until a full collection (rare in a server: ragsite.asgi.collect_less_often).
        beat = None
        if not task.done():
            # The consumer left mid-answer: cancelling the pump unwinds the
            # source, which closes the upstream LLM request and saves the answer.
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
