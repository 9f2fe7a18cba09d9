"""The chat page through docker-compose's proxy (deploy/nginx.conf, run by Debian's nginx) in
front of two daphne processes on one database: how each answer's tokens reach the browser.

    .venv/bin/python bench/proxy_bench.py [--questions 20] [--no-docs]

Two upstreams, in turn: the file as shipped (a browser's requests hashed to one process on
its CSRF cookie) and the same file with round robin. Each visitor loads the page, then asks
one question and reads its answer's stream, one visitor after another. An answer whose
stream reaches the process that generates it follows it from memory, each token as it
comes; one followed from the other process reads Postgres, in the event writer's batches.
Prints JSON and rewrites the section between the proxy-bench markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.processes

from docs_section import fmt, write_section
from load import chat_once, open_pages
from servers import (
    DOCUMENTS,
    FIRST_TOKEN_MS,
    INTER_TOKEN_MS,
    TOKENS,
    Served,
    command_line,
    log,
    machine,
    measure_servers,
)

from tests.processes import start_nginx

START, END = "<!-- proxy-bench:start -->", "<!-- proxy-bench:end -->"
UPSTREAMS = {
    "as shipped (hashed on the CSRF cookie)": None,
    "round robin": lambda conf: conf.replace("hash $affinity consistent;", ""),
}


async def through(served: Served, *, edit: Callable[[str], str] | None, questions: int) -> dict[str, Any]:
    ports = [int(url.rsplit(":", 1)[1]) for url in served.app_urls]
    proxy = start_nginx(ports=ports, edit=edit)
    try:
        visitors = await open_pages(proxy.url, questions, concurrency=1)
        results = [
            await chat_once(proxy.url, visitor, f"question {n}: how are documents chunked?", index=n, rid=str(n))
            for n, visitor in enumerate(visitors)
        ]
        routes = proxy.routes()
    finally:
        proxy.stop()
    asked = [port for method, path, port in routes if method == "POST" and path == "/chat/ask"]
    streamed = [port for method, path, port in routes if path.endswith("/stream")]
    # Tokens read in one chunk have a gap of 0: one arrival.
    arrivals = [1 + sum(gap > 0 for gap in r.token_gaps) for r in results if r.ok]
    overheads = [r.ttft * 1000 - FIRST_TOKEN_MS for r in results if r.ok and r.ttft is not None]
    return {
        "questions": questions,
        "errors": sum(not r.ok for r in results),
        "stream_on_the_generating_process": sum(a == s for a, s in zip(asked, streamed, strict=True)),
        "token_arrivals_per_answer": {"p50": statistics.median(arrivals), "min": min(arrivals), "max": max(arrivals)},
        "tokens_per_answer": TOKENS,
        "ttft_overhead_ms_p50": round(statistics.median(overheads), 1),
    }


def render_markdown(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    lines = [
        START,
        "### The chat page behind the proxy of docker-compose (`bench/proxy_bench.py`)",
        "",
        f"Measured {summary['date']} on {m['cpu']} (nproc {m['nproc']}), Python {m['python']}, nginx from Debian. "
        "Command, from the repository root:",
        "",
        "```bash",
        summary["command"],
        "```",
        "",
        "`deploy/nginx.conf` in front of two daphne processes on one database; the fake LLM sends its first token "
        f"after {FIRST_TOKEN_MS} ms, then {TOKENS} tokens {INTER_TOKEN_MS} ms apart. Visitors one after another, "
        "each loading the page, then asking and reading the answer's stream. A token arrival is a read that "
        "brought one or more tokens.",
        "",
        "| upstream | streams that reached the generating process | token arrivals per answer (p50, min–max) "
        "| TTFT overhead p50 | errors |",
        "|---|---|---|---|---|",
    ]
    for name, run in summary["upstreams"].items():
        a = run["token_arrivals_per_answer"]
        lines.append(
            f"| {name} | {run['stream_on_the_generating_process']} / {run['questions']} "
            f"| {fmt(a['p50'])} ({a['min']}–{a['max']}) of {run['tokens_per_answer']} "
            f"| {fmt(run['ttft_overhead_ms_p50'])} ms | {run['errors']} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args(argv)

    async def measure(served: Served) -> dict[str, Any]:
        runs = {}
        for name, edit in UPSTREAMS.items():
            runs[name] = await through(served, edit=edit, questions=args.questions)
            log(f"{name}: {json.dumps(runs[name])}")
        return {"upstreams": runs}

    [result], _ = measure_servers(["daphne"], measure=measure, documents=DOCUMENTS, keep_db=False, count=2)
    summary = {
        "benchmark": "proxy_bench",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "upstreams": result["upstreams"],
        "server": {k: result[k] for k in ("server", "version", "processes", "log_problems")},
    }
    print(json.dumps(summary, indent=2))
    if not args.no_docs:
        write_section(start=START, end=END, section=render_markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
