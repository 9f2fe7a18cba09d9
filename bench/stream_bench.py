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
import datetime as dt
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from docs_section import DOCS, fmt, write_section
from load import Bench
from servers import (
    DOCUMENTS,
    FIRST_TOKEN_MS,
    INTER_TOKEN_MS,
    ROOT,
    SERVERS,
    TOKENS,
    command_line,
    log,
    machine,
    measure_servers,
    package_version,
    topics,
)

START_MARK = "<!-- stream-bench:start -->"
END_MARK = "<!-- stream-bench:end -->"
LEVELS = ((1, 20), (10, 50), (100, 200))  # (concurrency, requests)
QUICK_LEVELS = ((1, 5), (10, 10), (100, 100))
# App TTFT overhead p50 goals, and the seed FastAPI app's figures (/work/shared/bench/README.md).
TARGET_P50_MS = {1: 15.0, 100: 250.0}
REFERENCE_P50_MS = {1: 10.0, 10: 28.0, 100: 510.0}


# --- report ---------------------------------------------------------------------------------------


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
    parser.add_argument("--no-docs", action="store_true", help=f"do not rewrite {DOCS.relative_to(ROOT)}")
    parser.add_argument("--keep-db", action="store_true", help="leave the var/bench Postgres running afterwards")
    args = parser.parse_args(argv)
    levels = args.level or (QUICK_LEVELS if args.quick else LEVELS)
    raw_args = list(sys.argv[1:] if argv is None else argv)

    began = time.monotonic()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    servers = SERVERS if args.server == "both" else (args.server,)
    try:
        results, ingest = measure_servers(
            servers, measure=lambda served: Bench(served).run(levels), documents=args.docs, keep_db=args.keep_db
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
        write_section(start=START_MARK, end=END_MARK, section=f"{START_MARK}\n{render_markdown(summary)}\n{END_MARK}")
        log(f"updated {DOCS.relative_to(ROOT)}")
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
