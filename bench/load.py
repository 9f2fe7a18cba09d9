"""The client side of a streaming benchmark: questions sent at a concurrency level to the app's
streams (``/rag/stream``, the chat page, floor_bench's floors) or straight to the fake LLM,
timed by ``sse_client.py`` and summed up with the fake's own records of each request.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from servers import FIRST_TOKEN_MS, Served, cpu_seconds, log, memory_mb, topics
from sse_client import (
    Event,
    Kind,
    LevelRun,
    RequestResult,
    RequestSpec,
    app_event_kind,
    chat_event_kind,
    openai_event_kind,
    run_level,
    stream_once,
)

CANCEL_CONCURRENCY = 20
CANCEL_AFTER_TOKENS = 5
WARMUP_REQUESTS = 5
REQUEST_TIMEOUT_S = 30.0
LEVEL_TIMEOUT_S = 150.0

_RID = re.compile(r"rid=([A-Za-z0-9_.-]+)")


# --- measurement ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def ms_stats(seconds: Sequence[float], qs: Sequence[int] = (50, 90, 99)) -> dict[str, float | None]:
    values = [s * 1000 for s in seconds]
    stats = {f"p{q}": rounded(percentile(values, q)) for q in qs}
    stats["max"] = rounded(max(values)) if values else None
    return stats


@dataclass(frozen=True)
class Target:
    name: str  # "app", "chat", "fake", or one of floor_bench's floors
    base: str  # http://127.0.0.1:PORT
    path: str = "/rag/stream"  # what a GET streams, for every target but the fake
    #: More server processes on one database (floor_bench --processes): requests take turns.
    mirrors: tuple[str, ...] = ()

    def spec(self, question: str, index: int = 0) -> RequestSpec:
        if self.name != "fake":
            base = (self.base, *self.mirrors)[index % (1 + len(self.mirrors))]
            return RequestSpec("GET", f"{base}{self.path}", params={"question": question})
        message = {"role": "user", "content": question}
        body = {"model": "bench-chat", "stream": True, "messages": [message], "max_tokens": 512}
        return RequestSpec("POST", f"{self.base}/v1/chat/completions", json_body=body)

    @property
    def kind_of(self) -> Callable[[Event], Kind]:
        return openai_event_kind if self.name == "fake" else app_event_kind


_ANSWER_STREAM = re.compile(r'sse-connect="(/chat/answers/\d+/stream)"')
_CSRF = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


@dataclass
class Visitor:
    """Someone with the chat page open: its session cookie and the page's CSRF token."""

    jar: aiohttp.CookieJar
    token: str


async def open_pages(base: str, n: int, concurrency: int = 10) -> list[Visitor]:
    """``n`` visitors who loaded the chat page (before the clock starts: a visitor loads the
    page once, then asks)."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> Visitor:
        jar = aiohttp.CookieJar(unsafe=True)  # the server is an IP address
        async with gate, aiohttp.ClientSession(cookie_jar=jar) as session:
            page = await (await session.get(f"{base}/")).text()
        token = _CSRF.search(page)
        return Visitor(jar=jar, token=token.group(1) if token else "")

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def chat_once(base: str, visitor: Visitor, question: str, *, index: int, rid: str) -> RequestResult:
    """A visitor with the page open asks: POST the question, then read the answer's stream.
    TTFT counts from the POST, which is when the visitor pressed Enter."""
    async with aiohttp.ClientSession(cookie_jar=visitor.jar, auto_decompress=False) as session:
        started = time.monotonic()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                form = {"question": question, "csrfmiddlewaretoken": visitor.token}
                async with session.post(f"{base}/chat/ask", data=form, headers={"HX-Request": "true"}) as resp:
                    fragment = await resp.text(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return RequestResult(index=index, rid=rid, started_at=started, error=f"ask: {exc!r}"[:200])
        stream = _ANSWER_STREAM.search(fragment)
        if stream is None:
            return RequestResult(
                index=index, rid=rid, started_at=started, status=resp.status, error=f"ask: HTTP {resp.status}"
            )
        result = await stream_once(
            session,
            RequestSpec("GET", f"{base}{stream.group(1)}"),
            index=index,
            rid=rid,
            kind_of=chat_event_kind,
            time_limit=REQUEST_TIMEOUT_S,
        )
        result.started_at = started
        result.named.pop("metrics", None)  # HTML for the page, not the JSON the summary reads
        return result


class Bench:
    """One server's measurements: the levels, the cancellation run, memory."""

    def __init__(self, served: Served) -> None:
        self.app = Target("app", served.app_urls[0], mirrors=tuple(served.app_urls[1:]))
        self.chat = Target("chat", served.app_urls[0])
        self.visitors: list[Visitor] = []
        self.fake = Target("fake", served.fake_url)
        self.fake_url = served.fake_url
        self.server_pids = list(served.server_pids)
        self.also = dict(served.also)
        self.questions = [f"How does {subject} {aspect} work" for subject, aspect in topics()]

    @property
    def server_pid(self) -> int:
        """The process whose memory is read (floor_bench --processes: each holds its share)."""
        return self.server_pids[0]

    def question(self, label: str, index: int) -> tuple[str, str]:
        rid = f"{label}-{index}-{uuid.uuid4().hex[:8]}"
        topic = self.questions[index % len(self.questions)]
        return rid, f"{topic}? (request {index}, rid={rid})"

    def requester(
        self, target: Target, label: str, *, cancel_after: int | None = None
    ) -> Callable[[aiohttp.ClientSession, int], Awaitable[RequestResult]]:
        async def request(session: aiohttp.ClientSession, index: int) -> RequestResult:
            rid, question = self.question(label, index)
            if target.name == "chat":
                return await chat_once(target.base, self.visitors[index], question, index=index, rid=rid)
            return await stream_once(
                session,
                target.spec(question, index),
                index=index,
                rid=rid,
                kind_of=target.kind_of,
                cancel_after=cancel_after,
                time_limit=REQUEST_TIMEOUT_S,
            )

        return request

    async def fake_call(self, method: str, path: str) -> Any:
        async with aiohttp.ClientSession() as session, session.request(method, f"{self.fake_url}{path}") as resp:
            resp.raise_for_status()
            return await resp.json()

    async def upstream_records(self) -> dict[str, dict[str, Any]]:
        """The fake's chat records by rid (the last one, should the app have retried)."""
        by_rid: dict[str, dict[str, Any]] = {}
        for record in await self.fake_call("GET", "/_records"):
            if match := _RID.search(record.get("question") or ""):
                by_rid[match.group(1)] = record
        return by_rid

    async def level(self, target: Target, concurrency: int, n: int) -> dict[str, Any]:
        label = f"{target.name}-c{concurrency}"
        if target.name == "chat":
            self.visitors = await open_pages(target.base, n)
        await self.fake_call("POST", "/_reset")
        cpu_before = self.server_cpu_seconds()
        async with asyncio.timeout(LEVEL_TIMEOUT_S):
            run = await run_level(self.requester(target, label), n=n, concurrency=concurrency)
        cpu_after = self.server_cpu_seconds()
        summary = summarize(run, await self.upstream_records())
        if target.name != "fake":
            if cpu_before is not None and cpu_after is not None:
                cpu = cpu_after - cpu_before
                summary["server_cpu_s"] = round(cpu, 2)
                summary["server_cpu_ms_per_request"] = round(cpu * 1000 / n, 1)
                # Near 1.0, the server process (one event loop, one GIL) is saturated.
                summary["server_cpu_share_of_wall"] = round(cpu / summary["wall_s"], 2) if summary["wall_s"] else None
            summary["server_memory"] = memory_mb(self.server_pid)
        return summary

    def server_cpu_seconds(self) -> float | None:
        seconds = [cpu_seconds(pid) for pid in self.server_pids]
        return None if None in seconds else sum(seconds)  # type: ignore[arg-type]

    async def warm_up(self) -> None:
        self.visitors = await open_pages(self.chat.base, WARMUP_REQUESTS)
        for target in (self.fake, self.app, self.chat):
            await run_level(self.requester(target, f"warmup-{target.name}"), n=WARMUP_REQUESTS, concurrency=1)

    async def cancellation(self) -> dict[str, Any]:
        n = CANCEL_CONCURRENCY
        await self.fake_call("POST", "/_reset")
        request = self.requester(self.app, "cancel", cancel_after=CANCEL_AFTER_TOKENS)
        async with asyncio.timeout(LEVEL_TIMEOUT_S):
            run = await run_level(request, n=n, concurrency=CANCEL_CONCURRENCY)
        closed = [r for r in run.results if r.closed_at is not None]
        # Give the app a moment to close the upstream streams, then read what the fake saw.
        deadline = time.monotonic() + 5.0
        while True:
            records = await self.upstream_records()
            pending = [r for r in closed if r.rid not in records or records[r.rid]["ended_at"] is None]
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        joined = [(r, records[r.rid]) for r in closed if r.rid in records]
        ended = [(r, rec) for r, rec in joined if rec["ended_at"] is not None]
        delays = [rec["ended_at"] - r.closed_at for r, rec in ended if r.closed_at is not None]
        after_close = [max(0, rec["tokens_sent"] - r.tokens) for r, rec in joined]
        return {
            "n": n,
            "concurrency": CANCEL_CONCURRENCY,
            "cancel_after_tokens": CANCEL_AFTER_TOKENS,
            "client_closed": len(closed),
            "client_errors": Counter(r.error for r in run.results if r.error),
            "upstream_matched": len(joined),
            "upstream_closed_by_client": sum(1 for _, rec in joined if rec["closed_by_client"]),
            "upstream_finished": sum(1 for _, rec in joined if rec["finished"]),
            "upstream_still_open": len(joined) - len(ended),
            "upstream_end_after_client_close_ms": {
                "p50": rounded(percentile([d * 1000 for d in delays], 50)),
                "max": rounded(max(delays) * 1000) if delays else None,
            },
            "tokens_seen_by_client": dict(sorted(Counter(r.tokens for r in closed).items())),
            "tokens_sent_after_close": {"total": sum(after_close), "max": max(after_close, default=None)},
        }

    async def run(self, levels: Sequence[tuple[int, int]]) -> dict[str, Any]:
        memory_before = memory_mb(self.server_pid)
        await self.warm_up()
        results: list[dict[str, Any]] = []
        for concurrency, n in levels:
            fake = await self.level(self.fake, concurrency, n)
            app = await self.level(self.app, concurrency, n)
            chat = await self.level(self.chat, concurrency, n)
            fake_p50 = fake["ttft_overhead_ms"]["p50"]
            app_p50 = app["ttft_overhead_ms"]["p50"]
            ratio = app_p50 / fake_p50 if app_p50 is not None and fake_p50 else None
            level = {"concurrency": concurrency, "n": n, "fake": fake, "app": app, "chat": chat}
            results.append({**level, "ratio_p50": rounded(ratio)})
            log(
                f"c={concurrency} n={n}: TTFT overhead p50 app {app_p50} ms / fake {fake_p50} ms, "
                f"p99 app {app['ttft_overhead_ms']['p99']} ms; errors app {app['errors']} fake {fake['errors']}; "
                f"chat page {chat['ttft_overhead_ms']['p50']} ms (errors {chat['errors']})"
            )
            for name, summary in (("app", app), ("chat page", chat), ("fake", fake)):
                if summary["errors"]:
                    log(f"  {name} errors at c={concurrency}: {summary['error_kinds']}")
        cancellation = await self.cancellation()
        log(
            f"cancellation: {cancellation['upstream_closed_by_client']}/{cancellation['n']} upstream closed, "
            f"{cancellation['upstream_end_after_client_close_ms']}, tokens after close "
            f"{cancellation['tokens_sent_after_close']}"
        )
        await asyncio.sleep(0.5)  # let the server settle (saving stopped answers) before reading memory
        return {
            "levels": results,
            "cancellation": cancellation,
            "memory": {"before_load": memory_before, "after_all_runs": memory_mb(self.server_pid)},
        }


def summarize(run: LevelRun, upstream: dict[str, dict[str, Any]]) -> dict[str, Any]:
    results = run.results
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    first_s = FIRST_TOKEN_MS / 1000
    tokens = sum(r.tokens for r in ok)
    # Split the overhead with the fake's records: until the upstream request arrived, and after.
    joined = [(r, upstream[r.rid]) for r in ok if r.rid in upstream and r.first_token_at is not None]
    to_upstream = [rec["started_at"] - r.started_at for r, rec in joined]
    relay = [r.first_token_at - (rec["started_at"] + first_s) for r, rec in joined if r.first_token_at]
    summary: dict[str, Any] = {
        "n": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": dict(Counter((r.error or "")[:120] for r in results if r.error).most_common(3)),
        "ttft_overhead_ms": ms_stats([t - first_s for t in ttfts]),
        "ttft_ms": ms_stats(ttfts, (50, 99)),
        "total_ms": ms_stats([r.total for r in ok if r.total is not None], (50, 99)),
        "first_to_last_token_ms": ms_stats(
            [r.last_token_at - r.first_token_at for r in ok if r.last_token_at and r.first_token_at], (50,)
        ),
        "tokens_per_request": {
            "min": min((r.tokens for r in ok), default=None),
            "max": max((r.tokens for r in ok), default=None),
        },
        "tokens_after_done": sum(r.tokens_after_done for r in results),
        "tokens_per_s": round(tokens / run.wall_s, 1) if run.wall_s > 0 else None,
        "wall_s": round(run.wall_s, 2),
        "upstream_matched": len(joined),
        "until_upstream_request_ms": ms_stats(to_upstream, (50, 99)),
        "upstream_first_token_to_client_ms": ms_stats(relay, (50, 99)),
        # Per-token latency as the client saw it, all the answers' gaps pooled.
        "client_token_gap_ms": ms_stats([gap for r in ok for gap in r.token_gaps], (50, 95, 99)),
    }
    # The app's own view, from its `metrics` event (milliseconds already).
    metrics = [json.loads(r.named["metrics"]) for r in ok if "metrics" in r.named]
    if metrics:
        summary["app_reported_ms"] = {
            key: {
                f"p{q}": rounded(percentile([m[key] for m in metrics if m.get(key) is not None], q)) for q in (50, 99)
            }
            # The gaps are each answer's own, between tokens as they came from the LLM.
            for key in ("retrieval_ms", "ttft_ms", "total_ms", "gap_p50_ms", "gap_p95_ms", "gap_max_ms", "tokens_per_s")
        }
    return summary
