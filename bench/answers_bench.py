"""Durable answers across two web processes: resume and stop latency, and what the event
log writes.

    python bench/answers_bench.py [--trials 20] [--no-write]

Two daphne processes on one embedded Postgres of their own (``var/bench-answers``), the
fake LLM of the tests in this process (50 tokens, 20 ms apart). Each trial asks
``/rag/stream?detach=1`` on process A, reads 5 tokens and drops the connection, then:

- resume: 250 ms later, reconnects with ``Last-Event-ID`` to A (same process) or B (the
  other one) and times the request to its first (replayed) event;
- stop: presses Stop (``POST /rag/answers/<id>/stop``) on A or B and times the press to
  the moment the fake LLM saw its request closed (one monotonic clock for all processes).

Then the rows and bytes the event log holds per complete answer. Prints JSON and rewrites
the section between the answers-bench markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_env import cpu_name, fake_llm_and_database  # noqa: E402
from docs_section import write_section  # noqa: E402

DATA_DIR = ROOT / "var" / "bench-answers"
START, END = "<!-- answers-bench:start -->", "<!-- answers-bench:end -->"
TOKENS = 50
INTER_TOKEN_MS = 20
RECONNECT_AFTER_S = 0.25


async def first_tokens(http: aiohttp.ClientSession, url: str, *, tokens: int) -> str:
    """Ask a detached question, read ``tokens`` tokens, drop the connection; the last event id."""
    from tests.sse import SSEParser

    parser, last_id, seen = SSEParser(), None, 0
    params = {"question": f"pgvector? {time.monotonic()}", "detach": "1", "format": "json"}
    async with http.get(f"{url}/rag/stream", params=params) as response:
        async for chunk in response.content.iter_any():
            for event in parser.feed(chunk):
                last_id = event.id
                seen += event.type == "message"
            if seen >= tokens:
                return last_id
    raise RuntimeError("the answer ended too soon")


async def resume_ms(http: aiohttp.ClientSession, url: str, last_id: str) -> float:
    from tests.sse import SSEParser

    parser = SSEParser()
    started = time.perf_counter()
    async with http.get(
        f"{url}/rag/stream", params={"question": "x", "format": "json"}, headers={"Last-Event-ID": last_id}
    ) as response:
        async for chunk in response.content.iter_any():
            if parser.feed(chunk):
                elapsed = (time.perf_counter() - started) * 1000
                break
        async for _ in response.content.iter_any():
            pass  # to its end, so that the next trial starts on a quiet server
    return elapsed


async def stop_ms(http: aiohttp.ClientSession, url: str, last_id: str, fake) -> float:
    key = last_id.split(".")[0]
    pressed = time.monotonic()
    async with http.post(f"{url}/rag/answers/{key}/stop") as response:
        assert (await response.json())["stopped"], "the answer had already ended"
    record = await asyncio.to_thread(fake.wait_for_close, -1, 10)
    return (record.ended_at - pressed) * 1000


async def trials(a: str, b: str, fake, n: int) -> dict:
    results: dict[str, list[float]] = {k: [] for k in ("resume_same", "resume_other", "stop_same", "stop_other")}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        for _ in range(n):
            for target, name in ((a, "resume_same"), (b, "resume_other")):
                last_id = await first_tokens(http, a, tokens=5)
                # A client reconnects after a pause (EventSource's retry delay is about 3 s):
                # by then there are events to replay, stored (a flush is 100 ms) as well as in
                # A's memory. Reconnecting sooner would time the wait for the next token.
                await asyncio.sleep(RECONNECT_AFTER_S)
                results[name].append(await resume_ms(http, target, last_id))
            for target, name in ((a, "stop_same"), (b, "stop_other")):
                fake.clear_records()
                last_id = await first_tokens(http, a, tokens=5)
                results[name].append(await stop_ms(http, target, last_id, fake))
    return {
        name: {"p50_ms": round(statistics.median(v), 1), "max_ms": round(max(v), 1), "n": len(v)}
        for name, v in results.items()
    }


def log_size(since: datetime.datetime) -> dict:
    """Rows and bytes of the event logs of the answers this run completed (the database
    may hold others: the c=1000 runs use it too)."""
    import django

    django.setup()
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT count(e.id), sum(pg_column_size(e.*)), m.tokens
            FROM rag_message m JOIN rag_answerevents e ON e.message_id = m.id
            WHERE m.status = 'complete' AND m.created_at >= %s GROUP BY m.id, m.tokens
            """,
            [since],
        )
        rows = cursor.fetchall()
    return {
        "answers": len(rows),
        "tokens_per_answer": statistics.median(r[2] for r in rows),
        "rows_per_answer_p50": statistics.median(r[0] for r in rows),
        "bytes_per_answer_p50": statistics.median(r[1] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from django.db import connections

    from ragsite.embedded_db import stop_embedded_server
    from tests.processes import answers, free_port, start

    fake, environment = fake_llm_and_database(data_dir=DATA_DIR, tokens=TOKENS, inter_token_ms=INTER_TOKEN_MS)
    webs = []
    try:
        for name in ("a", "b"):
            port = free_port()
            argv = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "ragsite.asgi:application"]
            webs.append(
                start(
                    f"bench-{name}",
                    argv,
                    env=environment,
                    port=port,
                    ready=lambda p=port: answers(f"http://127.0.0.1:{p}/healthz"),
                )
            )
        since = datetime.datetime.now(datetime.UTC)
        latencies = asyncio.run(trials(webs[0].url, webs[1].url, fake, args.trials))
        time.sleep(1)  # the stopped answers' last flush (100 ms) lands before the log is read
        result = {
            "date": datetime.date.today().isoformat(),
            "cpu": cpu_name(),
            "nproc": os.cpu_count(),
            "trials": args.trials,
            "latency": latencies,
            "log": log_size(since),
        }
    finally:
        for web in webs:
            web.stop()
        fake.stop()
        # Stopped as it was started, by this script: nothing of it keeps running afterwards.
        connections.close_all()
        stop_embedded_server(DATA_DIR)
    print(json.dumps(result, indent=2))
    if not args.no_write:
        write_doc(result)


def write_doc(r: dict) -> None:
    lat, log = r["latency"], r["log"]

    def cell(name: str) -> str:
        return f"{lat[name]['p50_ms']} / {lat[name]['max_ms']} ms"

    section = "\n".join(
        [
            START,
            "### Durable answers across two web processes (`bench/answers_bench.py`)",
            "",
            f"Measured {r['date']} on {r['nproc']} cores ({r['cpu']}): two daphne processes on one embedded "
            f"Postgres, the tests' fake LLM ({TOKENS} tokens, {INTER_TOKEN_MS} ms apart), {r['trials']} trials each. "
            "Every trial asks `/rag/stream?detach=1` on process A, reads 5 tokens and drops the connection; "
            f"a resume reconnects {int(RECONNECT_AFTER_S * 1000)} ms later.",
            "",
            "| After the drop | Same process (A) | The other process (B) |",
            "|---|---|---|",
            f"| Resume with `Last-Event-ID`: request to first event, p50 / max | {cell('resume_same')} "
            f"| {cell('resume_other')} |",
            f"| Stop: press to the upstream request closed, p50 / max | {cell('stop_same')} | {cell('stop_other')} |",
            "",
            f"The event log of a complete answer of {log['tokens_per_answer']} tokens: "
            f"{log['rows_per_answer_p50']} rows and {log['bytes_per_answer_p50']:,} bytes "
            f"(p50 over {log['answers']} answers; rows written every 100 ms, one per answer per flush).",
            END,
        ]
    )
    write_section(start=START, end=END, section=section)


if __name__ == "__main__":
    main()
