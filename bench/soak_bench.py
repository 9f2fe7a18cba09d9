"""Nothing lost, nothing stuck: 1,000 uploads through two workers while questions stream,
one worker killed mid-document and started again.

    python bench/soak_bench.py [--uploads 1000] [--no-write]

On an embedded Postgres of its own (``var/bench-soak``), with the tests' fake LLM in this
process: one daphne answering ``/rag/stream`` questions four at a time for the whole run,
two ``db_worker`` processes, and the uploads submitted as the admin submits them. They mix
good files (Markdown, HTML, PDF, DOCX) with every bad kind the worker must survive: empty,
broken and encrypted PDFs, random bytes, a zip bomb, HTML nested 10,000 deep (given up at
the parse time limit), an embedding server error, and a copy of an earlier file. When a
third of them are done, worker 1 is killed with SIGKILL while it holds a document, and
started again the way docker-compose starts it (``requeue_interrupted``, then the worker).

It reports what no deployment may have: documents lost (a submission whose document is
gone), stuck (not ready or failed at the end), partial (ready without all its chunks, or
failed with chunks of a first version), files that ended other than their kind says, and
the workers' RSS. Prints JSON and rewrites its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_env import cpu_name, fake_llm_and_database  # noqa: E402
from docs_section import write_section  # noqa: E402

DATA_DIR = ROOT / "var" / "bench-soak"
START, END = "<!-- soak-bench:start -->", "<!-- soak-bench:end -->"
PARSE_TIMEOUT_S = 1
QUESTIONS_AT_ONCE = 4
KILL_AT = 1 / 3
DEADLINE_S = 900
SOAK_SETTINGS = {"RAG_PARSE_TIMEOUT_S": str(PARSE_TIMEOUT_S), "RAG_LLM_TIMEOUT": "10"}
GOOD = ("md", "html", "pdf", "docx")
BAD = ("empty", "broken_pdf", "encrypted_pdf", "junk", "zip_bomb", "deep_html", "embed_error", "copy")


def upload(i: int, run: str) -> tuple[str, str, bytes]:
    """The i-th upload: (kind, file name, bytes); good ones two to one over bad ones."""
    from tests.files import docx_bytes, encrypted_pdf_bytes, pdf_bytes, zip_bomb_docx_bytes

    kinds = [*GOOD, *GOOD, *GOOD, *GOOD, *BAD]
    kind = kinds[i % len(kinds)]
    words = f"Soak {run} document {i} tells about topic {i * 7919 % 1000} and its {i % 13} facets."
    match kind:
        case "md":
            return kind, f"doc{i}.md", f"# Note {i}\n\n{words}\n\n{words} More on it.".encode()
        case "html":
            return kind, f"doc{i}.html", f"<html><body><h1>Page {i}</h1><p>{words}</p></body></html>".encode()
        case "pdf":
            return kind, f"doc{i}.pdf", pdf_bytes(f"Report {i}", words)
        case "docx":
            return kind, f"doc{i}.docx", docx_bytes([("h1", f"Memo {i}"), ("p", words)])
        case "empty":
            return kind, f"empty{i}.md", b"   \n"
        case "broken_pdf":
            return kind, f"broken{i}.pdf", b"%PDF-1.4 truncated " + str(i).encode()
        case "encrypted_pdf":
            return kind, f"locked{i}.pdf", encrypted_pdf_bytes(words)
        case "junk":
            return kind, f"junk{i}.pdf", os.urandom(2048)
        case "zip_bomb":
            return kind, f"bomb{i}.docx", zip_bomb_docx_bytes(20)
        case "deep_html":
            return kind, f"deep{i}.html", b"<h1>" * 10_000 + words.encode() + b"</h1>" * 10_000
        case "embed_error":
            return kind, f"fails{i}.md", f"# Fails {i}\n\n{words} fault=embed500".encode()
        case "copy":
            return kind, f"copy{i}.md", upload(0, run)[2]  # the first upload's bytes, under another name
    raise AssertionError(kind)


def rss_mb(pid: int) -> float | None:
    try:
        found = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return round(int(found.group(1)) / 1024, 1) if found else None


class Questions(threading.Thread):
    """Questions to /rag/stream, QUESTIONS_AT_ONCE at a time, until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.done, self.errors, self.stopping = url, 0, 0, threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(self._loop(http, n) for n in range(QUESTIONS_AT_ONCE)))

    async def _loop(self, http: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while not self.stopping.is_set():
            i += 1
            try:
                params = {"question": f"What is topic {i * 31 % 1000} about? ({n}.{i})"}
                async with http.get(f"{self.url}/rag/stream", params=params) as response:
                    body = await response.text()
                ok = response.status == 200 and body.rstrip().endswith("[DONE]") and "event: error" not in body
            except aiohttp.ClientError:
                ok = False
            self.done += ok
            self.errors += not ok


def worker(name: str, environment: dict[str, str]):
    from tests.processes import start

    args = ["db_worker", "--no-reload", "--no-startup-delay", "--interval", "0.2", "--queue-name", "*"]
    return start(name, [sys.executable, "manage.py", *args], env=environment, port=0, ready=lambda: True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uploads", type=int, default=1000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from tests.processes import answers, free_port, start

    fake, environment = fake_llm_and_database(data_dir=DATA_DIR, tokens=20, inter_token_ms=10, **SOAK_SETTINGS)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db.models import Count

    from rag.models import Chunk, Collection, Document
    from rag.services import ingestion

    run = datetime.datetime.now(datetime.UTC).strftime("%H%M%S")
    collection = Collection.objects.create(name=f"soak-{run}")
    port = free_port()
    web = start(
        "soak-web",
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "ragsite.asgi:application"],
        env=environment,
        port=port,
        ready=lambda: answers(f"http://127.0.0.1:{port}/healthz"),
    )
    workers = [worker("soak-worker1", environment), worker("soak-worker2", environment)]
    questions = Questions(web.url)
    began = time.monotonic()
    try:
        questions.start()
        submitted = []
        for i in range(args.uploads):
            kind, name, data = upload(i, run)
            result = ingestion.submit_file(collection=collection, name=name, data=data)
            submitted.append((kind, result))
        documents = Document.objects.filter(collection=collection)

        def settled() -> int:
            return documents.filter(status__in=Document.SETTLED).count()

        while settled() < 20:
            time.sleep(0.2)  # polling the database for progress, not timing a race
        rss_before = {w.name: rss_mb(w.pid) for w in workers}  # warm: models and parsers loaded
        while settled() < KILL_AT * len(submitted):
            time.sleep(0.2)
        # Worker 1 dies holding a document (the out-of-memory killer, a node drained).
        held = documents.exclude(status__in=(*Document.SETTLED, Document.Status.QUEUED)).first()
        workers[0].proc.send_signal(signal.SIGKILL)
        workers[0].proc.wait()
        killed_at = time.monotonic()
        # Started again as docker-compose does; a run is taken for dead when it has not moved for 5 s.
        time.sleep(5)
        requeued = io.StringIO()
        call_command("requeue_interrupted", "--older-than", "5", stdout=requeued)
        workers[0] = worker("soak-worker1-again", environment)
        while documents.exclude(status__in=Document.SETTLED).exists() and time.monotonic() - began < DEADLINE_S:
            time.sleep(0.5)
        elapsed = time.monotonic() - began
        rss_after = {w.name: rss_mb(w.pid) for w in workers}
    finally:
        questions.stopping.set()
        questions.join(30)
        for process in [web, *workers]:
            process.stop()
        fake.stop()

    by_id = {d.pk: d for d in documents}
    chunks = dict(
        Chunk.objects.filter(document__collection=collection)
        .values("document_id")
        .annotate(n=Count("pk"))
        .values_list("document_id", "n")
    )
    lost = [r.name for _, r in submitted if r.outcome != "duplicate" and r.document_id not in by_id]
    stuck = [d.source for d in by_id.values() if d.status not in Document.SETTLED]
    partial = [
        d.source
        for d in by_id.values()
        if (d.status == "ready" and (not d.chunk_count or chunks.get(d.pk, 0) != d.chunk_count))
        or (d.status == "failed" and chunks.get(d.pk, 0) and not d.content)
    ]
    expected = {"ready": GOOD, "failed": tuple(k for k in BAD if k != "copy")}
    wrong = [
        f"{kind}:{r.name}:{by_id[r.document_id].status}"
        for kind, r in submitted
        if r.document_id in by_id
        and r.outcome != "duplicate"
        and kind not in expected.get(by_id[r.document_id].status, ())
    ]
    result = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
        "nproc": os.cpu_count(),
        "uploads": len(submitted),
        "outcomes_at_submit": dict(sorted(_count(r.outcome for _, r in submitted).items())),
        "by_kind": {
            kind: dict(
                sorted(
                    _count(
                        r.outcome if r.outcome == "duplicate" else by_id[r.document_id].status
                        for k, r in submitted
                        if k == kind and (r.outcome == "duplicate" or r.document_id in by_id)
                    ).items()
                )
            )
            for kind in (*GOOD, *BAD)
        },
        "statuses_at_end": dict(sorted(_count(d.status for d in by_id.values()).items())),
        "lost": len(lost),
        "stuck": len(stuck),
        "partial": len(partial),
        "wrong_outcome": wrong[:20],
        "killed_holding": held.source if held else None,
        "requeue_interrupted_said": requeued.getvalue().strip(),
        "killed_holding_ended": by_id[held.pk].status if held and held.pk in by_id else None,
        "seconds": round(elapsed, 1),
        "seconds_after_the_kill": round(elapsed - (killed_at - began), 1),
        "questions": {"answered": questions.done, "failed": questions.errors},
        "worker_rss_mb": {"before": rss_before, "after": rss_after},
    }
    print(json.dumps(result, indent=2))
    if not args.no_write:
        write_doc(result)


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def write_doc(r: dict) -> None:
    rss = r["worker_rss_mb"]
    section = "\n".join(
        [
            START,
            "### Soak: uploads that must not be lost (`bench/soak_bench.py`)",
            "",
            f"Measured {r['date']} on {r['nproc']} cores ({r['cpu']}): {r['uploads']:,} uploads, two thirds good "
            "(Markdown, HTML, PDF, DOCX) and one third of every bad kind (empty, broken and encrypted PDFs, random "
            f"bytes, a zip bomb, HTML nested 10,000 deep given up at a {PARSE_TIMEOUT_S} s parse limit, an "
            "embedding server error, a copy of an earlier file), through two workers while "
            f"{QUESTIONS_AT_ONCE} questions at a time stream from `/rag/stream`. When a third were done, "
            "worker 1 was killed with SIGKILL holding a document, then started again as docker-compose does "
            "(`requeue_interrupted`, then the worker).",
            "",
            "| Lost | Stuck | Partial | Ended other than their kind | Took | Questions answered / failed |",
            "|---|---|---|---|---|---|",
            f"| {r['lost']} | {r['stuck']} | {r['partial']} | {len(r['wrong_outcome'])} | {r['seconds']} s "
            f"| {r['questions']['answered']} / {r['questions']['failed']} |",
            "",
            f"At submission: {r['outcomes_at_submit']}; at the end: {r['statuses_at_end']}; by kind: "
            f"{r['by_kind']}. The document the "
            f"killed worker held ({r['killed_holding']}) ended {r['killed_holding_ended']}. Worker RSS (MB) "
            f"once warm (20 documents done): {rss['before']}; at the end: {rss['after']} (worker 1's is the "
            "restarted one's).",
            END,
        ]
    )
    write_section(start=START, end=END, section=section)


if __name__ == "__main__":
    main()
