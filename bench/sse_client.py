"""A small async Server-Sent Events load client for the streaming benchmark.

``SSEParser`` follows the parts of the WHATWG event-stream rules a load test depends on: lines end
in CRLF, LF or CR (also when a CRLF is split across two reads), a leading BOM is dropped, ``:``
lines are comments, one space after the colon is removed, ``data:`` lines are joined with LF, an
empty line dispatches the event (only if it had data), ``event:`` names it (``message`` when
unnamed). ``id`` and ``retry`` are not needed here and are ignored.

``stream_once`` runs one streaming request and times it; ``run_level`` runs ``n`` of them with
``concurrency`` in flight. All times are ``time.monotonic()`` seconds, which on Linux is one clock
shared by every process, so they can be compared with the fake LLM's own records.
"""

from __future__ import annotations

import asyncio
import codecs
import enum
import itertools
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiohttp

__all__ = [
    "Event",
    "Kind",
    "LevelRun",
    "RequestResult",
    "RequestSpec",
    "SSEParser",
    "app_event_kind",
    "chat_event_kind",
    "openai_event_kind",
    "run_level",
    "stream_once",
]

_LINE_END = re.compile(r"\r\n|\r|\n")  # "\r\n" first, so that a CRLF is one line end
_BOM = "\ufeff"


class Event(NamedTuple):
    type: str
    data: str


class SSEParser:
    """Incremental parser: ``feed`` it bytes as they arrive, get the events they complete."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # an unfinished line
        self._skip_lf = False  # the last read ended in CR: an LF starting the next one belongs to it
        self._at_start = True
        self._type = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[Event]:
        text = self._decoder.decode(chunk)
        if not text:
            return []
        if self._at_start:
            self._at_start = False
            text = text.removeprefix(_BOM)
        if self._skip_lf:
            self._skip_lf = False
            text = text.removeprefix("\n")
        buffer = self._pending + text
        events: list[Event] = []
        start = 0
        for match in _LINE_END.finditer(buffer):
            self._line(buffer[start : match.start()], events)
            start = match.end()
        if buffer.endswith("\r"):
            self._skip_lf = True
        self._pending = buffer[start:]
        return events

    def _line(self, line: str, events: list[Event]) -> None:
        if not line:
            if self._data:
                events.append(Event(self._type or "message", "\n".join(self._data)))
            self._type = ""
            self._data = []
            return
        if line.startswith(":"):
            return  # a comment (": stream open", ": keep-alive")
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value


class Kind(enum.Enum):
    TOKEN = "token"
    DONE = "done"
    ERROR = "error"
    OTHER = "other"


def app_event_kind(event: Event) -> Kind:
    """The app's protocol: unnamed events are tokens, ``data: [DONE]`` ends, ``event: error`` fails."""
    if event.type == "message":
        return Kind.DONE if event.data == "[DONE]" else Kind.TOKEN
    return Kind.ERROR if event.type == "error" else Kind.OTHER


def chat_event_kind(event: Event) -> Kind:
    """The chat page's stream: named ``token`` events (HTML-escaped text), ``done`` last."""
    kinds = {"token": Kind.TOKEN, "done": Kind.DONE, "error": Kind.ERROR}
    return kinds.get(event.type, Kind.OTHER)


def openai_event_kind(event: Event) -> Kind:
    """OpenAI chat-completion chunks: a token is a chunk whose ``choices[0].delta.content`` is not empty."""
    if event.data == "[DONE]":
        return Kind.DONE
    try:
        payload = json.loads(event.data)
    except ValueError:
        return Kind.ERROR
    if not isinstance(payload, dict) or "error" in payload:
        return Kind.ERROR
    choices = payload.get("choices") or [{}]
    return Kind.TOKEN if (choices[0].get("delta") or {}).get("content") else Kind.OTHER


@dataclass
class RequestResult:
    index: int
    rid: str
    started_at: float
    status: int | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    done_at: float | None = None
    ended_at: float | None = None
    tokens: int = 0
    tokens_after_done: int = 0
    closed_at: float | None = None  # when the client chose to close the connection (cancellation runs)
    error: str | None = None
    named: dict[str, str] = field(default_factory=dict)  # the last data of each other event type
    #: Seconds between consecutive tokens as they arrived (0 for tokens read in the same chunk).
    token_gaps: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started_at

    @property
    def total(self) -> float | None:
        end = self.done_at or self.ended_at
        return None if end is None else end - self.started_at

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RequestSpec:
    method: str
    url: str
    params: dict[str, str] | None = None
    json_body: dict[str, Any] | None = None


async def stream_once(
    session: aiohttp.ClientSession,
    spec: RequestSpec,
    *,
    index: int,
    rid: str,
    kind_of: Callable[[Event], Kind],
    cancel_after: int | None = None,
    time_limit: float = 60.0,
) -> RequestResult:
    """One streaming request, read to the end of the body (or closed after ``cancel_after`` tokens).

    Errors are recorded, never raised: a non-200 status, an error event, a transport failure or a
    timeout, and a stream that ends without its done marker.
    """
    result = RequestResult(index=index, rid=rid, started_at=time.monotonic())
    parser = SSEParser()
    try:
        async with (
            asyncio.timeout(time_limit),
            session.request(spec.method, spec.url, params=spec.params, json=spec.json_body) as resp,
        ):
            result.status = resp.status
            if resp.status != 200:
                body = (await resp.text(errors="replace"))[:200]
                result.error = f"HTTP {resp.status}: {body}"
                return result
            async for chunk in resp.content.iter_any():
                now = time.monotonic()
                for event in parser.feed(chunk):
                    kind = kind_of(event)
                    if kind is Kind.TOKEN:
                        if result.done_at is not None:
                            result.tokens_after_done += 1
                            continue
                        result.tokens += 1
                        if result.last_token_at is not None:
                            result.token_gaps.append(now - result.last_token_at)
                        result.last_token_at = now
                        if result.first_token_at is None:
                            result.first_token_at = now
                    elif kind is Kind.DONE and result.done_at is None:
                        result.done_at = now
                    elif kind is Kind.ERROR and result.error is None:
                        result.error = f"error event: {event.data[:200]}"
                    elif kind is Kind.OTHER:
                        result.named[event.type] = event.data
                if cancel_after is not None and result.tokens >= cancel_after:
                    # Taken just before closing, to compare with when the upstream stream ended.
                    result.closed_at = time.monotonic()
                    resp.close()
                    return result
    except TimeoutError:
        result.error = f"timeout after {time_limit:g} s"
    except aiohttp.ClientError as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        result.ended_at = time.monotonic()
    if result.error is None and result.done_at is None:
        result.error = "stream ended without its done marker"
    return result


@dataclass
class LevelRun:
    concurrency: int
    results: list[RequestResult]
    wall_s: float


async def run_level(
    request: Callable[[aiohttp.ClientSession, int], Awaitable[RequestResult]],
    *,
    n: int,
    concurrency: int,
) -> LevelRun:
    """Run ``n`` requests, ``concurrency`` at a time, on a fresh connection pool."""
    results: list[RequestResult] = []
    indexes = itertools.count()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    # Timeouts are per request (stream_once); aiohttp's own 5 minute total would only get in the way.
    client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout, auto_decompress=False) as session:

        async def worker() -> None:
            while (i := next(indexes)) < n:
                results.append(await request(session, i))

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
        wall = time.monotonic() - started
    results.sort(key=lambda r: r.index)
    return LevelRun(concurrency=concurrency, results=results, wall_s=wall)
