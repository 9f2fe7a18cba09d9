"""1,000 streams on one process: ``/rag/stream`` against the floors under it.

What it measures
    ``stream_bench.py --level 1000:1000`` says how far ``/rag/stream`` is from its target at
    1,000 simultaneous clients. This says why: the same server process (started with
    ``bench/floor_settings.py``, the app's settings plus the views of ``bench/floor_urls.py``)
    serves streams that each do one layer less than an answer, and the same client measures
    them one after the other, 1,000 at once, on the same fake LLM (200 ms to the first token,
    then 50 tokens 20 ms apart):

    * ``bare``: a Django view that sleeps like the fake and streams 50 tokens; no LLM, no
      database. What the server, Django and the middleware cost for 1,000 streams.
    * ``aiohttp``: relays the fake's stream read with a plain aiohttp session.
    * ``client``: relays it through the app's chat provider (the ``openai`` client).
    * ``app``: ``/rag/stream``, which adds the question's embedding, the search, the answer's
      row and its event log.
    * ``fake``: the client straight to the fake, the floor of the machine itself.

    For each: TTFT overhead (client TTFT - 200 ms) p50 / p99, the first-to-last token span
    (the fake's own is about 1,000 ms), errors, and the server's CPU per stream. The targets
    run in rounds, each round in the same order, so that the machine's drift spreads over
    all of them; the app's peak RSS per open stream comes from its level in the first round,
    the first load the process sees after warming up.

    With ``--processes N``, N server processes on the one database take the requests in turn
    (a load balancer's round robin, without its cost): what more processes buy on this
    machine. Its figures go to a section of their own.

    Each target's row also says what Python's garbage collector cost its server during the
    level (``/_floor/gc``): seconds in all, and the longest pause. With ``--gc-baseline``, a
    second server beside the first runs with Python's own thresholds (700 allocations, not
    the app's RAG_GC_GEN0_THRESHOLD), and ``/rag/stream`` on it is one more target of each
    round: what the app's setting buys, in the same run.

    With ``--baseline REV``, ``/rag/stream`` of an earlier commit is one more target: its
    files as ``git archive`` has them, in ``var/bench-baseline/``, on a database of its own
    that its own code migrates and fills with the same documents. A target set on another
    machine compares only as a ratio to such a baseline measured in the same run.

How to run
    ``.venv/bin/python bench/floor_bench.py [--server daphne|uvicorn|both] [--rounds 2] [--processes 1]
    [--gc-baseline] [--baseline REV]``
    from the repository root (about a minute per round and server). Like stream_bench, it
    binds loopback only, stops what it started, keeps logs in ``var/bench/logs/``, prints
    one JSON object as its last line and rewrites its section of ``docs/benchmarks.md``
    unless ``--no-docs``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from docs_section import fmt, write_section
from load import WARMUP_REQUESTS, Bench, Target
from servers import (
    DOCUMENTS,
    FIRST_TOKEN_MS,
    INTER_TOKEN_MS,
    ROOT,
    SERVERS,
    TOKENS,
    Beside,
    command_line,
    log,
    machine,
    measure_servers,
    memory_mb,
)
from sse_client import run_level


def markers(processes: int) -> tuple[str, str]:
    """Its section of docs/benchmarks.md: one of its own for a run on several processes."""
    name = "floor-bench" if processes == 1 else f"floor-bench-{processes}p"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


TARGET_P50_MS = 1500.0  # /rag/stream at c=1000 (issue 12)
# In the order each round runs them: the app first, so that its peak RSS is its own.
TARGETS = (
    ("app", "/rag/stream", "`/rag/stream`: the whole answer"),
    ("client", "/_floor/client", "the fake's stream relayed through the app's chat provider (`openai` client)"),
    ("aiohttp", "/_floor/aiohttp", "the fake's stream relayed through a plain aiohttp session"),
    ("bare", "/_floor/bare", "no LLM, no database: sleeps and streams like the fake"),
    ("fake", "", "the client straight to the fake LLM"),
)
#: With --gc-baseline: `/rag/stream` on a server beside the first, with Python's own
#: garbage collection thresholds (700, 10, 10) instead of the app's (RAG_GC_GEN0_THRESHOLD).
PYTHON_GC = "app-python-gc"
WHAT = {name: what for name, _, what in TARGETS} | {
    PYTHON_GC: "`/rag/stream` on a server with Python's own garbage collection thresholds (700)"
}
#: With --baseline REV: `/rag/stream` of that commit, a target named app@<commit>.
BASELINE = "app@"
BASELINE_DIR = ROOT / "var" / "bench-baseline"


def baseline_source(rev: str) -> Path:
    """The files of commit ``rev``, fresh in var/bench-baseline/src."""
    source = BASELINE_DIR / "src"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(source, filter="data")
    return source


async def measure(bench: Bench, *, concurrency: int, rounds: int) -> dict[str, Any]:
    targets = [
        Target(name, bench.fake_url, path) if name == "fake" else Target(name, bench.app.base, path, bench.app.mirrors)
        for name, path, _ in TARGETS
    ]
    # Beside the app, in each round: the servers started beside it (--gc-baseline, --baseline).
    targets[1:1] = [Target(label, base) for label, base in bench.also.items()]
    for target in targets:
        await run_level(bench.requester(target, f"warmup-{target.name}"), n=WARMUP_REQUESTS, concurrency=1)
    before = memory_mb(bench.server_pid)
    runs: dict[str, list[dict[str, Any]]] = {target.name: [] for target in targets}
    peak_after_app: float | None = None
    for round_ in range(1, rounds + 1):
        for target in targets:
            collected = await collector(target)
            summary = await bench.level(target, concurrency, concurrency)
            summary["server_gc"] = await collector(target, since=collected)
            runs[target.name].append(summary)
            if target.name == "app" and peak_after_app is None:
                peak_after_app = summary["server_memory"]["peak_rss_mb"]
            log(
                f"round {round_} {target.name}: TTFT overhead p50 {summary['ttft_overhead_ms']['p50']} ms, "
                f"CPU {summary.get('server_cpu_ms_per_request')} ms per stream, errors {summary['errors']}"
            )
    rss_before = before["rss_mb"]
    streams = concurrency / (1 + len(bench.app.mirrors))  # what the first process held, whose memory this is
    grown = peak_after_app - rss_before if peak_after_app is not None and rss_before else None
    per_stream_kb = grown * 1024 / streams if grown is not None else None
    return {
        "concurrency": concurrency,
        "rounds": rounds,
        "rss_before_mb": rss_before,
        "app_peak_rss_mb": peak_after_app,
        "app_rss_per_open_stream_kb": round(per_stream_kb, 1) if per_stream_kb is not None else None,
        "targets": {name: [_brief(summary) for summary in summaries] for name, summaries in runs.items()},
    }


async def collector(target: Target, *, since: dict[str, float] | None = None) -> dict[str, float]:
    """What Python's garbage collector has cost the target's server processes (``/_floor/gc``):
    its seconds in all and its longest pause; since an earlier read, with ``since``."""
    if target.name == "fake" or target.name.startswith(BASELINE):
        return {}  # an earlier commit has no /_floor/gc
    reads = []
    async with aiohttp.ClientSession() as session:
        for base in (target.base, *target.mirrors):
            async with session.get(f"{base}/_floor/gc") as response:
                reads.append(await response.json())
    seconds = sum(read["seconds"] for read in reads) - (since or {}).get("seconds", 0.0)
    return {"seconds": seconds, "longest_pause_s": max(read["longest_pause_s"] for read in reads)}


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "ttft_overhead_ms": summary["ttft_overhead_ms"],
        "first_to_last_token_ms_p50": summary["first_to_last_token_ms"]["p50"],
        "until_upstream_request_ms_p50": summary["until_upstream_request_ms"]["p50"],
        "errors": summary["errors"],
        "error_kinds": summary["error_kinds"],
        "server_cpu_ms_per_request": summary.get("server_cpu_ms_per_request"),
        "server_cpu_share_of_wall": summary.get("server_cpu_share_of_wall"),
        "server_gc_s": summary["server_gc"].get("seconds"),
        "server_gc_longest_pause_ms": (
            summary["server_gc"]["longest_pause_s"] * 1000 if summary["server_gc"] else None
        ),
    }


def _collected(run: dict[str, Any]) -> str:
    if run["server_gc_s"] is None:
        return "–"
    return f"{run['server_gc_s']:.2f} s, {fmt(run['server_gc_longest_pause_ms'])} ms"


def _per_round(runs: Sequence[dict[str, Any]], key: str) -> str:
    return " / ".join(fmt(run[key]) for run in runs)


def render_markdown(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    c, n = summary["concurrency"], summary["processes"]
    start, end = markers(n)
    where = "one process" if n == 1 else f"{n} processes on one database"
    lines = [
        start,
        f"### {c:,} streams on {where}: `/rag/stream` against its floors (`bench/floor_bench.py`)",
        "",
        f"Measured {summary['date']} on {m['cpu']} (nproc {m['nproc']}), Python {m['python']}; the fake LLM, "
        "Postgres and the client share the two cores with the server. Command, from the repository root:",
        "",
        "```bash",
        summary["command"],
        "```",
        "",
        f"{c:,} clients at once against each target in turn, {summary['rounds']} rounds, "
        + ("one server process" if n == 1 else f"{n} server processes taking the requests in turn")
        + f"; the fake LLM sends its first token after {FIRST_TOKEN_MS} ms, then {TOKENS} tokens "
        f"{INTER_TOKEN_MS} ms apart. TTFT overhead = client TTFT − {FIRST_TOKEN_MS} ms, p50 of each round, and the "
        f"worst p99. Server CPU is all the processes'. The target for `/rag/stream` is ≤ {TARGET_P50_MS:,.0f} ms p50 "
        "on one process.",
    ]
    for result in summary["servers"]:
        lines += [
            "",
            f"**{result['server']} {result['version']}**",
            "",
            "| target | what it streams | TTFT overhead p50 (each round) | p99 | first-to-last token p50 "
            "| server CPU per stream | garbage collection: seconds, longest pause | errors |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, runs in result["targets"].items():
            cpu = gc = "–"
            what = WHAT.get(name) or f"`/rag/stream` of {name.removeprefix(BASELINE)} (its own checkout and database)"
            if name != "fake":
                cpu = f"{_per_round(runs, 'server_cpu_ms_per_request')} ms"
                gc = " / ".join(_collected(run) for run in runs)
            p50s = " / ".join(fmt(run["ttft_overhead_ms"]["p50"]) for run in runs)
            p99 = max((run["ttft_overhead_ms"]["p99"] or 0) for run in runs)
            lines.append(
                f"| {name} | {what} | {p50s} | {fmt(p99)} | {_per_round(runs, 'first_to_last_token_ms_p50')} "
                f"| {cpu} | {gc} | {sum(run['errors'] for run in runs)} / {c * len(runs)} |"
            )
        app = [run["ttft_overhead_ms"]["p50"] for run in result["targets"]["app"]]
        met = all(p50 is not None and p50 <= TARGET_P50_MS for p50 in app)
        for name, runs in result["targets"].items():
            if name.startswith(BASELINE):
                theirs = [run["ttft_overhead_ms"]["p50"] for run in runs]
                ratios = [a / b if a and b else None for a, b in zip(app, theirs, strict=True)]
                lines += [
                    "",
                    f"`/rag/stream` against {name}, TTFT overhead p50 in each round: "
                    + " / ".join(f"{r:.2f}×" if r else "–" for r in ratios)
                    + ".",
                ]
        lines += [
            "",
            f"`/rag/stream`: {'met' if met else 'missed'} (median of the rounds "
            f"{fmt(statistics.median(app))} ms). Its peak RSS"
            + ("" if n == 1 else " in the first process")
            + f": {fmt(result['rss_before_mb'])} MB before the load, {fmt(result['app_peak_rss_mb'])} MB after its "
            f"first round, {fmt(result['app_rss_per_open_stream_kb'])} KB per open stream.",
        ]
    lines.append(end)
    return "\n".join(lines)


def beside(*, gc_baseline: bool, baseline: str | None) -> dict[str, Beside]:
    servers = {}
    if gc_baseline:
        servers[PYTHON_GC] = Beside(env={"RAG_GC_GEN0_THRESHOLD": "700"})
    if baseline:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", f"{baseline}^{{commit}}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        # Its own settings: floor_settings (bench/ on the path) may not fit its code.
        env = {
            "DJANGO_SETTINGS_MODULE": "ragsite.settings",
            "PYTHONPATH": "",
            "RAG_DATA_DIR": str(BASELINE_DIR / "data"),
        }
        servers[BASELINE + rev] = Beside(env=env, source=baseline_source(rev))
    return servers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=(*SERVERS, "both"), default="daphne")
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--processes", type=int, default=1, help="server processes on the one database")
    parser.add_argument(
        "--gc-baseline",
        action="store_true",
        help="also measure /rag/stream on a server with Python's own garbage collection thresholds",
    )
    parser.add_argument("--baseline", metavar="REV", help="also measure /rag/stream of this earlier commit")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--keep-db", action="store_true", help="leave the var/bench Postgres running afterwards")
    args = parser.parse_args(argv)
    raw_args = list(sys.argv[1:] if argv is None else argv)

    began = time.monotonic()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        results, _ = measure_servers(
            SERVERS if args.server == "both" else (args.server,),
            measure=lambda served: measure(Bench(served), concurrency=args.concurrency, rounds=args.rounds),
            documents=DOCUMENTS,
            keep_db=args.keep_db,
            # bench/ on the path: the server imports floor_settings and floor_urls from it.
            env={"DJANGO_SETTINGS_MODULE": "floor_settings", "PYTHONPATH": str(ROOT / "bench")},
            count=args.processes,
            also=beside(gc_baseline=args.gc_baseline, baseline=args.baseline),
        )
    except KeyboardInterrupt as exc:
        log(f"interrupted ({str(exc) or 'SIGINT'}); stopping everything")
        return 130

    summary = {
        "benchmark": "floor_bench",
        "date": date,
        "command": command_line(raw_args),
        "machine": machine(),
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "processes": args.processes,
        "servers": results,
        "duration_s": round(time.monotonic() - began, 1),
    }
    if not args.no_docs:
        start, end = markers(args.processes)
        write_section(start=start, end=end, section=render_markdown(summary))
        log("updated docs/benchmarks.md")
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
