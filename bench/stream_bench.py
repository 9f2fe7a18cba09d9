"""Streaming benchmark: what the app adds to an LLM's time to first token, under load.

What it measures
    The app is served (daphne by default, uvicorn with uvloop + httptools on request) against a
    fake OpenAI-compatible LLM (``tests.fake_openai``: 200 ms to the first token, then 50 tokens
    20 ms apart) and an embedded Postgres of its own in ``var/bench``, holding ~30 generated
    Markdown documents embedded by the fake. An async SSE client (``bench/sse_client.py``) opens
    ``GET /rag/stream?question=...`` streams and times the first unnamed (token) event:

    * TTFT overhead = client TTFT - 200 ms, i.e. everything that is not the LLM's own latency
      (HTTP, embedding the question, vector search, the upstream request, relaying tokens). It is
      reported at p50/p90/p99 for c=1 (20 sequential requests), c=10 (n=50) and c=100 (n=200),
      with the total time, the token throughput and the errors (non-200, ``event: error``, a
      stream without ``data: [DONE]``, transport failures, timeouts).
    * "Fake alone": the same client, same levels, straight against the fake's
      ``/v1/chat/completions``, measured in the same run just before each app level. It is the
      floor on this machine at this moment; ``app / fake`` at p50 is the figure to compare across
      runs, because absolute figures move with whatever else the machine is doing.
    * Cancellation: 20 concurrent clients each close their connection after 5 tokens. The fake's
      own records (``GET /_records``), joined on a ``rid=`` marker carried in every question,
      say whether the app closed each upstream stream, how long after the client left
      (``time.monotonic()`` is one clock for all processes on Linux), and how many tokens the
      upstream sent that the client never saw.
    * Server memory (VmRSS) before the load and after all runs, and its CPU time per level.

    Before measuring, 5 requests warm up each target (not counted). Every question is unique.

How to run
    ``make bench`` or ``.venv/bin/python bench/stream_bench.py [--server daphne|uvicorn|both]``
    from the repository root. It takes about 2 minutes per server, binds and targets loopback
    only, and stops everything it started on exit (Ctrl+C included), the ``var/bench`` Postgres
    too unless ``--keep-db``. Subprocess logs are in ``var/bench/logs/``. It prints one JSON
    object as the last line of stdout (progress goes to stderr) and rewrites the section between
    ``<!-- stream-bench:start -->`` and ``<!-- stream-bench:end -->`` in ``docs/benchmarks.md``
    (``--no-docs`` leaves it alone; ``--quick`` is a smaller smoke run that never writes it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
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

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "var" / "bench"
LOG_DIR = DATA_DIR / "logs"
DOCS_FILE = ROOT / "docs" / "benchmarks.md"
START_MARK = "<!-- stream-bench:start -->"
END_MARK = "<!-- stream-bench:end -->"

FIRST_TOKEN_MS = 200
INTER_TOKEN_MS = 20
TOKENS = 50
DOCUMENTS = 30
LEVELS = ((1, 20), (10, 50), (100, 200))  # (concurrency, requests)
QUICK_LEVELS = ((1, 5), (10, 10), (100, 100))
CANCEL_CONCURRENCY = 20
CANCEL_AFTER_TOKENS = 5
WARMUP_REQUESTS = 5
REQUEST_TIMEOUT_S = 30.0
LEVEL_TIMEOUT_S = 150.0
# App TTFT overhead p50 goals, and the seed FastAPI app's figures (/work/shared/bench/README.md).
TARGET_P50_MS = {1: 15.0, 100: 250.0}
REFERENCE_P50_MS = {1: 10.0, 10: 28.0, 100: 510.0}
SERVERS = ("daphne", "uvicorn")

_RID = re.compile(r"rid=([A-Za-z0-9_.-]+)")


def log(message: str) -> None:
    print(f"[stream-bench] {message}", file=sys.stderr, flush=True)


# --- subprocesses --------------------------------------------------------------------------------


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Treated like Ctrl+C, so that every cleanup runs. Only KeyboardInterrupt (and SystemExit) get
    # out of an event loop's callbacks; any other exception raised here would just be logged.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Processes:
    """The long-running subprocesses (fake, app server): stopped by their pid, in reverse order."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log_path = LOG_DIR / f"{name}.log"
        with log_path.open("wb") as out:
            # A session of its own: Ctrl+C reaches only this script, which then stops it in order.
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        self._procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        for entry in [e for e in self._procs if e[1] is proc]:
            self._procs.remove(entry)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def stop_all(self) -> None:
        while self._procs:
            self.stop(self._procs[-1][1])


def run_step(name: str, argv: list[str], env: dict[str, str], timeout: float = 300) -> str:
    """Run a command to completion (migrate, ingest); its output goes to var/bench/logs/NAME.log."""
    log_path = LOG_DIR / f"{name}.log"
    with log_path.open("wb") as out:
        try:
            proc = subprocess.run(
                argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name} took more than {timeout:g} s; see {log_path}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{log_tail(log_path)}")
    return log_tail(log_path, 5)


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], name: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}):\n{log_tail(LOG_DIR / f'{name}.log')}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{name} did not answer {url} within {timeout:g} s:\n{log_tail(LOG_DIR / f'{name}.log')}"
            )
        time.sleep(0.1)


def stop_embedded_db(env: dict[str, str]) -> None:
    """Stop the var/bench Postgres that the app's processes started and left running (by design)."""
    pgdata = DATA_DIR / "pgdata"
    if not (pgdata / "postmaster.pid").exists():
        return
    user = "'pgserver'" if os.geteuid() == 0 else "None"  # pgserver runs Postgres as 'pgserver' under root
    code = (
        f"import pathlib, pgserver; pgserver.pg_ctl(['-w', 'stop'], pgdata=pathlib.Path({str(pgdata)!r}), user={user})"
    )
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=60)


def server_argv(server: str, port: int) -> list[str]:
    if server == "daphne":
        # Twisted listens with a backlog of 50 by default: 100 clients connecting at once overflow
        # it, and the dropped connections retry a second later (the TCP SYN timeout).
        return [
            sys.executable,
            "-m",
            "daphne",
            "-e",
            f"tcp:port={port}:interface=127.0.0.1:backlog=1024",
            "ragsite.asgi:application",
        ]
    return [
        *(sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port)),
        *("--no-access-log", "--log-level", "warning", "--loop", "uvloop", "--http", "httptools"),
        "ragsite.asgi:application",
    ]


def app_env(fake_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "OPENAI_", "DJANGO_"))}
    env.pop("DATABASE_URL", None)
    env.update(
        DJANGO_SETTINGS_MODULE="ragsite.settings",
        DJANGO_DEBUG="0",  # debug mode keeps every SQL query in memory
        RAG_DATA_DIR=str(DATA_DIR),
        OPENAI_BASE_URL=f"http://127.0.0.1:{fake_port}/v1",
        OPENAI_API_KEY="bench",
        RAG_EMBEDDING_MODEL="bench-embed",
        RAG_CHAT_MODEL="bench-chat",
    )
    return env


# --- /proc ----------------------------------------------------------------------------------------


def memory_mb(pid: int) -> dict[str, float | None]:
    """VmRSS (now) and VmHWM (peak) of a process, in MB."""
    values: dict[str, float | None] = {"rss_mb": None, "peak_rss_mb": None}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = round(int(rest.split()[0]) / 1024, 1)
    return values


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# --- the knowledge base ---------------------------------------------------------------------------

SUBJECTS = (
    "daphne workers",
    "uvicorn loops",
    "pgvector search",
    "HNSW indexes",
    "Server-Sent Events",
    "WebSocket answers",
    "embedding models",
    "document chunking",
    "prompt budgets",
    "connection pools",
)
ASPECTS = ("configuration", "troubleshooting", "performance")
_WORDS = (
    "latency throughput buffer proxy nginx header timeout retry token stream cancel client server socket "
    "thread loop queue batch vector cosine distance recall index build memory cache process worker core "
    "schema migration table column row transaction isolation lock backup restore replica snapshot metric "
    "log trace alert budget citation source snippet heading paragraph sentence overlap model tokenizer"
)
VOCABULARY = _WORDS.split()


def topics() -> list[tuple[str, str]]:
    return [(subject, aspect) for subject in SUBJECTS for aspect in ASPECTS]


def write_documents(folder: Path, count: int) -> None:
    """Deterministic Markdown documents, so that a second run's ingest finds them unchanged."""
    rng = random.Random(20261125)
    for i, (subject, aspect) in enumerate(topics()[:count]):
        lines = [f"# {subject.capitalize()}: {aspect}", ""]
        for section in ("Overview", "Details", "Pitfalls"):
            lines += [f"## {section}", ""]
            for _ in range(3):
                sentences = []
                for _ in range(5):
                    words = " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(8, 14)))
                    sentences.append(f"The {aspect} of {subject} involves {words}.")
                lines += [" ".join(sentences), ""]
        (folder / f"doc{i:02d}.md").write_text("\n".join(lines), encoding="utf-8")


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

    def __init__(self, *, app_urls: Sequence[str], fake_url: str, server_pids: Sequence[int]) -> None:
        self.app = Target("app", app_urls[0], mirrors=tuple(app_urls[1:]))
        self.chat = Target("chat", app_urls[0])
        self.visitors: list[Visitor] = []
        self.fake = Target("fake", fake_url)
        self.fake_url = fake_url
        self.server_pids = list(server_pids)
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


def client_runner() -> asyncio.Runner:
    """uvloop for the client when available: less of the 2 cores goes to measuring."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def log_problems(path: Path) -> list[str]:
    """Tracebacks and errors in a server log, to report rather than to hide."""
    lines = log_tail(path, 100000).splitlines()
    hits = [line for line in lines if "Traceback" in line or " ERROR " in line or "Error:" in line]
    return hits[:10]


# --- report ---------------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if abs(value) < 100 else f"{value:,.0f}"


def render_markdown(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    lines = [
        "### Streaming: time to first token under load (`bench/stream_bench.py`)",
        "",
        f"Measured {summary['date']} on {m['cpu']} (nproc {m['nproc']}), Python {m['python']}, "
        f"Django {summary['versions']['django']}; the machine was shared with other work, so compare the "
        "app/fake ratio rather than absolute figures. Command, from the repository root:",
        "",
        "```bash",
        summary["command"],
        "```",
        "",
        f"Fake LLM (`python -m tests.fake_openai`): {FIRST_TOKEN_MS} ms to the first token, then {TOKENS} tokens "
        f"{INTER_TOKEN_MS} ms apart. TTFT overhead = client TTFT − {FIRST_TOKEN_MS} ms (ms, p50 / p99). "
        '"Fake alone" is the same client straight against the fake\'s `/v1/chat/completions` in the same run. '
        "Target and reference are the app's overhead at p50; the reference is the seed FastAPI app "
        "(one uvicorn worker, same fake, 2 cores).",
    ]
    for result in summary["servers"]:
        lines += [
            "",
            f"**{result['server']} {result['version']}**",
            "",
            "| level | fake alone | app | app ÷ fake (p50) | target | seed reference | total p50 | tokens/s | errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for level in result["levels"]:
            c, app, fake = level["concurrency"], level["app"], level["fake"]
            target = TARGET_P50_MS.get(c)
            app_p50 = app["ttft_overhead_ms"]["p50"]
            verdict = (
                "–"
                if target is None
                else f"≤ {target:g} ({'met' if app_p50 is not None and app_p50 <= target else 'missed'})"
            )
            reference = "–" if (ref := REFERENCE_P50_MS.get(c)) is None else f"{ref:g}"
            label = f"c={c} (n={level['n']}{', sequential' if c == 1 else ''})"
            ratio = "–" if level["ratio_p50"] is None else f"{level['ratio_p50']:.1f}×"
            lines.append(
                f"| {label} | {fmt(fake['ttft_overhead_ms']['p50'])} / {fmt(fake['ttft_overhead_ms']['p99'])} "
                f"| {fmt(app_p50)} / {fmt(app['ttft_overhead_ms']['p99'])} "
                f"| {ratio} | {verdict} | {reference} "
                f"| {fmt(app['total_ms']['p50'])} | {fmt(app['tokens_per_s'])} "
                f"| {app['errors']} / {app['n']} (fake {fake['errors']}) |"
            )
        lines += [
            "",
            "The chat page (`POST /chat/ask`, then the answer's stream; each visitor has its own session and "
            "loaded the page before the clock starts; TTFT counted from the POST), against `/rag/stream` in the "
            "same run:",
            "",
            "| level | `/rag/stream` | chat page | chat ÷ stream (p50) | server CPU per question | errors |",
            "|---|---|---|---|---|---|",
        ]
        for level in result["levels"]:
            app, chat = level["app"], level["chat"]
            app_p50, chat_p50 = app["ttft_overhead_ms"]["p50"], chat["ttft_overhead_ms"]["p50"]
            ratio = f"{chat_p50 / app_p50:.1f}×" if chat_p50 is not None and app_p50 else "–"
            lines.append(
                f"| c={level['concurrency']} (n={level['n']}) | {fmt(app_p50)} / {fmt(app['ttft_overhead_ms']['p99'])} "
                f"| {fmt(chat_p50)} / {fmt(chat['ttft_overhead_ms']['p99'])} | {ratio} "
                f"| {fmt(app.get('server_cpu_ms_per_request'))} / {fmt(chat.get('server_cpu_ms_per_request'))} ms "
                f"| {chat['errors']} / {chat['n']} |"
            )
        lines += [
            "",
            f"Per-token latency of `/rag/stream` (the fake sends a token every {INTER_TOKEN_MS} ms): the gaps "
            "between consecutive tokens as the client received them, all answers pooled (p50 / p95 / max; tokens "
            "read in one chunk count as 0); and the app's own figures from each answer's metrics event, the gaps "
            "between tokens as they came from the LLM (the median answer's p50 / p95 / max) and its tokens per "
            "second:",
            "",
            "| level | client gap p50 / p95 / max | app gap p50 / p95 / max | app tokens/s per answer |",
            "|---|---|---|---|",
        ]
        for level in result["levels"]:
            client = level["app"]["client_token_gap_ms"]
            own = level["app"].get("app_reported_ms", {})
            gap_keys = ("gap_p50_ms", "gap_p95_ms", "gap_max_ms")
            app_gaps = " / ".join(fmt(own.get(key, {}).get("p50")) for key in gap_keys)
            lines.append(
                f"| c={level['concurrency']} (n={level['n']}) "
                f"| {fmt(client['p50'])} / {fmt(client['p95'])} / {fmt(client['max'])} "
                f"| {app_gaps} | {fmt(own.get('tokens_per_s', {}).get('p50'))} |"
            )
        levels = result["levels"]
        before = "/".join(fmt(lv["app"]["until_upstream_request_ms"]["p50"]) for lv in levels)
        relay = "/".join(fmt(lv["app"]["upstream_first_token_to_client_ms"]["p50"]) for lv in levels)
        names = "/".join(str(lv["concurrency"]) for lv in levels)
        cancel = result["cancellation"]
        delay = cancel["upstream_end_after_client_close_ms"]
        after = cancel["tokens_sent_after_close"]
        memory = result["memory"]
        lines += [
            "",
            f"Where the app's overhead goes (p50 at c={names}, from the fake's records): {before} ms until the "
            f"upstream chat request arrives, then {relay} ms from the upstream's first token to the client.",
            "",
            f"Cancellation (c={cancel['concurrency']}, each client closes after "
            f"{cancel['cancel_after_tokens']} tokens): "
            f"{cancel['upstream_closed_by_client']}/{cancel['n']} upstream streams closed by the app "
            f"({cancel['upstream_finished']} ran to the end, {cancel['upstream_still_open']} still open), "
            f"{fmt(delay['p50'])} ms p50 / {fmt(delay['max'])} ms max after the client left; "
            f"{after['total']} tokens sent upstream after the clients closed (max {after['max']} per stream).",
            "",
            f"Server memory (VmRSS): {fmt(memory['before_load']['rss_mb'])} MB before the load, "
            f"{fmt(memory['after_all_runs']['rss_mb'])} MB after all runs "
            f"(peak {fmt(memory['after_all_runs']['peak_rss_mb'])} MB).",
        ]
    return "\n".join(lines)


DOCS_INTRO = """# Benchmarks

Measured figures and how to reproduce them. Each section between markers is rewritten by the
script that produced it; edit outside the markers.
"""


def update_docs(section: str) -> None:
    block = f"{START_MARK}\n{section}\n{END_MARK}"
    text = DOCS_FILE.read_text(encoding="utf-8") if DOCS_FILE.exists() else DOCS_INTRO
    start, end = text.find(START_MARK), text.find(END_MARK)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(END_MARK) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS_FILE.parent.mkdir(parents=True, exist_ok=True)
    DOCS_FILE.write_text(text, encoding="utf-8")


def command_line(argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    shown = os.path.relpath(python, ROOT) if python.is_relative_to(ROOT) else str(python)
    script = Path(sys.argv[0]).resolve()  # this benchmark, or one that imports it (floor_bench)
    return shlex.join([shown, os.path.relpath(script, ROOT), *argv])


# --- main -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def started_fake(processes: Processes) -> Iterator[tuple[str, int]]:
    port = free_port()
    argv = [sys.executable, "-m", "tests.fake_openai", "--port", str(port)]
    argv += ["--first-token-ms", str(FIRST_TOKEN_MS), "--inter-token-ms", str(INTER_TOKEN_MS), "--tokens", str(TOKENS)]
    proc = processes.start("fake_openai", argv, {**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(f"{url}/_records", proc, "fake_openai", timeout=30)
    try:
        yield url, port
    finally:
        processes.stop(proc)


def prepare_database(env: dict[str, str], *, documents: int) -> list[str]:
    """Migrate the var/bench database and ingest the generated documents; the ingest's output."""
    run_step("migrate", [sys.executable, "manage.py", "migrate", "--noinput"], env)
    with tempfile.TemporaryDirectory(prefix="stream-bench-docs-") as folder:
        write_documents(Path(folder), min(documents, len(topics())))
        ingest = run_step("ingest", [sys.executable, "manage.py", "ingest", folder], env).splitlines()
    log(f"database ready ({ingest[-1] if ingest else 'ingested'})")
    return ingest


Measure = Callable[[Bench], Awaitable[dict[str, Any]]]


def measure_servers(
    servers: Sequence[str],
    *,
    measure: Measure,
    documents: int,
    keep_db: bool,
    env: dict[str, str] | None = None,
    count: int = 1,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Start the fake LLM and the database, then each server in turn (``count`` processes of
    it on the one database), and run ``measure`` against it: each server's results, and the
    ingest's output. ``env`` is added to the app's. Everything started is stopped, the
    database too unless ``keep_db``."""
    processes = Processes()
    app: dict[str, str] | None = None
    try:
        with started_fake(processes) as (fake_url, fake_port):
            log(f"fake LLM on {fake_url}; logs in {LOG_DIR.relative_to(ROOT)}/")
            app = app_env(fake_port) | (env or {})
            ingest = prepare_database(app, documents=documents)
            results = [
                measure_server(s, env=app, fake_url=fake_url, processes=processes, measure=measure, count=count)
                for s in servers
            ]
    finally:
        processes.stop_all()
        if app is not None and not keep_db:
            stop_embedded_db(app)
    return results, ingest


def measure_server(
    server: str, *, env: dict[str, str], fake_url: str, processes: Processes, measure: Measure, count: int = 1
) -> dict[str, Any]:
    names = [server] + [f"{server}-{i}" for i in range(2, count + 1)]  # their logs' names
    ports = [free_port() for _ in names]
    procs = [processes.start(name, server_argv(server, port), env) for name, port in zip(names, ports, strict=True)]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for name, url, proc in zip(names, urls, procs, strict=True):
            wait_http_ok(f"{url}/healthz", proc, name)
            log(f"{name} (pid {proc.pid}) is up on {url}")
        bench = Bench(app_urls=urls, fake_url=fake_url, server_pids=[proc.pid for proc in procs])
        with client_runner() as runner:
            result = runner.run(measure(bench))
        for name, proc in zip(names, procs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited during the run ({proc.returncode})")
    finally:
        for proc in procs:
            processes.stop(proc)
    return {
        "server": server,
        "version": package_version(server),
        "command": shlex.join(
            [os.path.relpath(a, ROOT) if a == sys.executable else a for a in server_argv(server, ports[0])]
        ),
        "processes": count,
        **result,
        "log_problems": [line for name in names for line in log_problems(LOG_DIR / f"{name}.log")],
    }


def _level(value: str) -> tuple[int, int]:
    concurrency, _, n = value.partition(":")
    try:
        return int(concurrency), int(n or concurrency)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CONCURRENCY:REQUESTS, such as 100:200, not {value!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Streaming TTFT benchmark of the app against a fake LLM.")
    parser.add_argument("--server", choices=(*SERVERS, "both"), default="daphne")
    parser.add_argument("--docs", type=int, default=DOCUMENTS, help=f"documents to ingest (at most {len(topics())})")
    parser.add_argument("--quick", action="store_true", help="fewer requests, for a smoke run (never writes docs)")
    parser.add_argument(
        "--level",
        action="append",
        type=_level,
        metavar="C:N",
        help="measure only these levels (concurrency:requests; repeatable; never writes docs)",
    )
    parser.add_argument("--no-docs", action="store_true", help=f"do not rewrite {DOCS_FILE.relative_to(ROOT)}")
    parser.add_argument("--keep-db", action="store_true", help="leave the var/bench Postgres running afterwards")
    args = parser.parse_args(argv)
    levels = args.level or (QUICK_LEVELS if args.quick else LEVELS)
    raw_args = list(sys.argv[1:] if argv is None else argv)

    signal.signal(signal.SIGTERM, _on_sigterm)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    servers = SERVERS if args.server == "both" else (args.server,)
    try:
        results, ingest = measure_servers(
            servers, measure=lambda bench: bench.run(levels), documents=args.docs, keep_db=args.keep_db
        )
    except KeyboardInterrupt as exc:
        log(f"interrupted ({str(exc) or 'SIGINT'}); stopping everything")
        return 130
    except Exception as exc:
        log(f"failed: {exc}")
        raise

    summary: dict[str, Any] = {
        "benchmark": "stream_bench",
        "date": date,
        "command": command_line(raw_args),
        "machine": machine(),
        "versions": {"django": package_version("django"), "aiohttp": package_version("aiohttp")},
        "fake": {"first_token_ms": FIRST_TOKEN_MS, "inter_token_ms": INTER_TOKEN_MS, "tokens": TOKENS},
        "documents": min(args.docs, len(topics())),
        "ingest": ingest[-1] if ingest else None,
        "quick": args.quick,
        "targets_app_overhead_p50_ms": TARGET_P50_MS,
        "reference_seed_overhead_p50_ms": REFERENCE_P50_MS,
        "servers": results,
        "duration_s": round(time.monotonic() - began, 1),
    }
    if not (args.quick or args.level or args.no_docs):
        update_docs(render_markdown(summary))
        log(f"updated {DOCS_FILE.relative_to(ROOT)}")
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
