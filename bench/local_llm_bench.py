"""What running the local chat model in its own process costs: TTFT and memory.

    python bench/local_llm_bench.py [--runs 20] [--no-write]

Until December 2026 each web process loaded the GGUF model and generated on a thread of
its own (the baseline below, kept here as it was); now ``manage.py llm_server`` serves it
and the web processes reach it over loopback HTTP through the OpenAI-compatible provider
(rag.providers.local.LocalChat). Measured in one run, same model, same prompts:

1. Time to first token at c=1 (sequential questions) and c=10 (ten at once: one model
   serves one request at a time, so the tenth waits for nine), in-process vs. the hop.
2. RSS: what loading the chat model adds to a process (what every web process paid
   before), the model server's own RSS, what MiniLM adds to a process that embeds, and a
   daphne web process after its warm-up, which must map no llama.cpp library.

Prints JSON and rewrites the section between the local-llm-bench markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from docs_section import write_section  # noqa: E402

from tests.processes import answers, free_port  # noqa: E402

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ragsite.settings")
os.environ["RAG_CHAT_PROVIDER"] = "local"

START, END = "<!-- local-llm-bench:start -->", "<!-- local-llm-bench:end -->"
SOURCES = "\n\n".join(
    f"[{n}] pgvector note {n}: HNSW indexes trade build time for recall; ef_search sets how many "
    "candidates a query visits, and iterative scans keep filtered searches from returning too few rows."
    for n in range(1, 5)
)
MAX_TOKENS = 8


def messages(i: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": f"Answer from these sources and cite them as [n].\n\n{SOURCES}"},
        {"role": "user", "content": f"Question {i}: what does ef_search change in a vector search?"},
    ]


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for {pid}")


def maps_llama(pid: int) -> bool:
    return "libllama" in Path(f"/proc/{pid}/maps").read_text()


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not answers(url):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer")
        time.sleep(0.1)  # polling a server that is starting


class InProcess:
    """The provider as it was: the model in this process, generating on a thread."""

    def __init__(self, gguf: Path) -> None:
        from llama_cpp import Llama

        self.llama = Llama(model_path=str(gguf), n_ctx=2048, verbose=False)
        self.lock = threading.Lock()

    async def first_token_ms(self, i: int) -> float:
        loop = asyncio.get_running_loop()
        first: asyncio.Future[float] = loop.create_future()
        started = time.perf_counter()

        def generate() -> None:
            with self.lock:
                for part in self.llama.create_chat_completion(
                    messages=messages(i), max_tokens=MAX_TOKENS, temperature=0, repeat_penalty=1.15, stream=True
                ):
                    if part["choices"][0]["delta"].get("content") and not first.done():
                        loop.call_soon_threadsafe(
                            lambda: first.done() or first.set_result((time.perf_counter() - started) * 1000)
                        )

        thread = threading.Thread(target=generate)
        thread.start()
        result = await first
        await asyncio.to_thread(thread.join)
        return result


class OverHttp:
    def __init__(self, url: str, gguf: Path) -> None:
        from rag.providers.local import LocalChat

        self.chat = LocalChat(url=url, model_path=str(gguf), timeout=120, max_retries=0)

    async def first_token_ms(self, i: int) -> float:
        started = time.perf_counter()
        ttft = None
        async for chunk in self.chat.stream(messages(i), max_tokens=MAX_TOKENS, temperature=0):
            if chunk.text and ttft is None:
                ttft = (time.perf_counter() - started) * 1000
        return ttft if ttft is not None else float("nan")


async def ttft(provider, *, runs: int) -> dict:
    await provider.first_token_ms(-1)  # warm: the first prompt fills the KV cache
    c1 = [await provider.first_token_ms(i) for i in range(runs)]
    c10: list[float] = []
    for round_ in range(3):
        c10 += await asyncio.gather(*(provider.first_token_ms(1000 + 10 * round_ + i) for i in range(10)))
    return {
        "c1_p50_ms": round(statistics.median(c1), 1),
        "c10_p50_ms": round(statistics.median(c10), 1),
        "c10_max_ms": round(max(c10), 1),
    }


def embedder_rss() -> dict:
    # The child imports this file by path (bench/ on sys.path) for rss_mb, as running it does.
    code = (
        "import os, sys, django, json; sys.path.insert(0, 'bench'); "
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'ragsite.settings'); "
        "django.setup(); from local_llm_bench import rss_mb; before = rss_mb(); "
        "from rag.providers.local import LocalEmbeddings; e = LocalEmbeddings(); e.warm(); "
        "e.embed_sync(['warm up the model with one sentence']); print(json.dumps([before, rss_mb()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    return {"process_before_mb": before, "process_after_mb": after, "added_mb": round(after - before, 1)}


def web_process_rss(llm_url: str) -> dict:
    port = free_port()
    env = {**os.environ, "RAG_LOCAL_LLM_URL": llm_url, "RAG_EMBEDDING_PROVIDER": "local"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "ragsite.asgi:application"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        return {"daphne_after_warmup_mb": rss_mb(proc.pid), "daphne_maps_libllama": maps_llama(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(10)


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def measure(args) -> dict:
    from rag.providers.local import bundled_gguf

    gguf = bundled_gguf()
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    result: dict = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu.group(1).strip() if cpu else platform.machine(),
        "nproc": os.cpu_count(),
        "model": gguf.name,
        "max_tokens": MAX_TOKENS,
    }
    port = free_port()
    supervisor = subprocess.Popen(
        [sys.executable, "manage.py", "llm_server", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_http(url + "/models")
        [server_pid] = children(supervisor.pid)

        before = rss_mb()
        in_process = InProcess(gguf)
        result["in_process"] = asyncio.run(ttft(in_process, runs=args.runs))
        result["rss"] = {"in_process_model_added_mb": round(rss_mb() - before, 1)}
        in_process.llama.close()

        from rag.providers import closing  # closes the HTTP client with the loop

        result["over_http"] = asyncio.run(closing(ttft(OverHttp(url, gguf), runs=args.runs)))
        result["rss"] |= {
            "model_server_mb": rss_mb(server_pid),
            "supervisor_mb": rss_mb(supervisor.pid),
            "model_server_maps_libllama": maps_llama(server_pid),
        }
        result["rss"] |= web_process_rss(url)
        result["rss"]["embedder"] = embedder_rss()
    finally:
        supervisor.terminate()
        supervisor.wait(15)
    for level in ("c1_p50_ms", "c10_p50_ms"):
        result[f"hop_{level}"] = round(result["over_http"][level] - result["in_process"][level], 1)
    return result


def write_doc(r: dict) -> None:
    a, b, rss = r["in_process"], r["over_http"], r["rss"]
    e = rss["embedder"]
    section = "\n".join(
        [
            START,
            "### The local chat model in its own process (`bench/local_llm_bench.py`)",
            "",
            f"Measured {r['date']} on {r['nproc']} cores ({r['cpu']}); {r['model']}, a prompt of four short "
            f"sources and a question, {r['max_tokens']} tokens per answer, temperature 0. Before: the model loaded "
            "in each web process, generating on a thread. Now: `manage.py llm_server` (llama-cpp-python's "
            "OpenAI-compatible server) and the app's OpenAI-compatible provider over loopback HTTP.",
            "",
            "| Time to first token | In the web process (before) | Its own process (now) | Added by the hop |",
            "|---|---|---|---|",
            f"| c=1, p50 | {a['c1_p50_ms']} ms | {b['c1_p50_ms']} ms | {r['hop_c1_p50_ms']} ms |",
            f"| c=10, p50 (one model, requests queue) | {a['c10_p50_ms']} ms | {b['c10_p50_ms']} ms "
            f"| {r['hop_c10_p50_ms']} ms |",
            f"| c=10, slowest | {a['c10_max_ms']} ms | {b['c10_max_ms']} ms | |",
            "",
            "| Memory (RSS) | MB |",
            "|---|---|",
            f"| What loading the chat model added to each web process (before) | {rss['in_process_model_added_mb']} |",
            f"| The model's server process, shared by every web process and worker (now) | {rss['model_server_mb']} |",
            f"| Its supervisor (`manage.py llm_server`) | {rss['supervisor_mb']} |",
            f"| A daphne web process after its warm-up, MiniLM loaded (now; maps llama.cpp: "
            f"{'yes' if rss['daphne_maps_libllama'] else 'no'}) | {rss['daphne_after_warmup_mb']} |",
            f"| What MiniLM adds to a process that embeds (torch included) | {e['added_mb']} "
            f"({e['process_before_mb']} → {e['process_after_mb']}) |",
            END,
        ]
    )
    write_section(start=START, end=END, section=section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import django

    django.setup()
    result = measure(args)
    print(json.dumps(result, indent=2))
    if not args.no_write:
        write_doc(result)


if __name__ == "__main__":
    main()
