"""Retrieval quality on real documents: the app's search against plain baselines.

    python bench/eval_corpora.py                 # once: builds var/eval/<corpus>/
    python bench/retrieval_eval.py [corpus ...] [--no-write]

Each corpus is a set of FAQ answers, each its own document with a neutral title, among
unrelated documents; each FAQ question is a query whose one relevant document is its
answer. Every method ranks documents (a document ranks where its best chunk does), and
is scored on the first ten: hit@1/5/10, MRR and nDCG@10. Rows, all measured in the same
run on the same chunks of the same embedder:

- BM25: Okapi BM25 (k1 1.2, b 0.75) over the app's chunks, lower-cased words, in Python.
- Plain dense: fixed windows of 200 tokens (30 overlap) with the title in front, exact
  cosine search in NumPy: what a first RAG tutorial does.
- The app: its own ingestion (structure-aware chunks, heading path and title) and its own
  search through ``rag.services.retrieval.retrieve``: chunks alone, then with the document
  weight (RAG_DOCUMENT_WEIGHT), then with the full-text score too (RAG_HYBRID_WEIGHT, the
  default), then with the chunks of the nearest documents among the candidates too
  (RAG_DOCUMENT_CANDIDATES, opt-in: it is slow on a large knowledge base).

Latency is per query, one at a time, the query's embedding included, with the k an answer
asks for (RAG_DEFAULT_K); the scores ask for 40 chunks, to rank ten documents.

Embeddings of document text are cached in var/eval/cache-<model>.sqlite, so that a second
run only re-embeds what changed; query embeddings are never cached (they are timed).
Writes its table to docs/benchmarks.md between the retrieval-eval markers.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import re
import sqlite3
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ragsite.settings")
os.environ.setdefault("RAG_EMBEDDING_PROVIDER", "local")

import django  # noqa: E402
from bench_env import machine, throwaway_database  # noqa: E402
from docs_section import write_section  # noqa: E402

django.setup()

import numpy as np  # noqa: E402
from asgiref.sync import sync_to_async  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402

from rag.models import Chunk, Collection, Document  # noqa: E402
from rag.providers import EmbeddingProvider, embedding_provider  # noqa: E402
from rag.services import documents as docs  # noqa: E402
from rag.services.retrieval import retrieve  # noqa: E402

START, END = "<!-- retrieval-eval:start -->", "<!-- retrieval-eval:end -->"
EVAL_DIR = ROOT / "var" / "eval"
#: Chunks asked for per query: enough distinct documents for the first ten.
K_CHUNKS = 40
#: The ranks scored.
TOP = 10
METRICS = ("hit@1", "hit@5", "hit@10", "mrr@10", "ndcg@10")


@dataclass(frozen=True)
class Corpus:
    name: str
    documents: list[dict]
    queries: list[dict]


def load(name: str) -> Corpus:
    folder = EVAL_DIR / name
    if not (folder / "documents.jsonl").exists():
        sys.exit(f"{folder} has no corpus: run `python bench/eval_corpora.py {name}` first.")

    def read(file: str) -> list[dict]:
        return [json.loads(line) for line in (folder / file).read_text().splitlines() if line.strip()]

    return Corpus(name, read("documents.jsonl"), read("queries.jsonl"))


class CachedEmbeddings(EmbeddingProvider):
    """The configured embedder with a disk cache for document text (not for queries)."""

    def __init__(self, inner: EmbeddingProvider) -> None:
        self.inner = inner
        self.model = inner.model
        self.description = inner.description
        EVAL_DIR.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"\W+", "-", inner.model)
        self.db = sqlite3.connect(EVAL_DIR / f"cache-{slug}.sqlite", check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS v (k TEXT PRIMARY KEY, v BLOB)")

    async def embed(self, texts: list[str]) -> list[list[float]]:
        keys = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
        found = dict(self.db.execute(f"SELECT k, v FROM v WHERE k IN ({','.join('?' * len(keys))})", keys).fetchall())
        missing = [i for i, key in enumerate(keys) if key not in found]
        if missing:
            vectors = await self.inner.embed([texts[i] for i in missing])
            for i, vector in zip(missing, vectors, strict=True):
                found[keys[i]] = np.asarray(vector, dtype=np.float32).tobytes()
            self.db.executemany("INSERT OR REPLACE INTO v VALUES (?, ?)", [(keys[i], found[keys[i]]) for i in missing])
            self.db.commit()
        return [np.frombuffer(found[key], dtype=np.float32).tolist() for key in keys]

    async def embed_query(self, text: str):
        return await self.inner.embed_query(text)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)


# --- scoring -------------------------------------------------------------------------------


def scores(ranked: list[list[str]], answers: list[str]) -> dict[str, float]:
    """hit@1/5/10, MRR and nDCG@10 of ranked document ids, one relevant document per query."""
    ranks = [ids[:TOP].index(a) + 1 if a in ids[:TOP] else None for ids, a in zip(ranked, answers, strict=True)]
    n = len(ranks)
    return {
        "hit@1": sum(r == 1 for r in ranks) / n,
        "hit@5": sum(r is not None and r <= 5 for r in ranks) / n,
        "hit@10": sum(r is not None for r in ranks) / n,
        "mrr@10": sum(1 / r for r in ranks if r) / n,
        "ndcg@10": sum(1 / math.log2(r + 1) for r in ranks if r) / n,
    }


def analyze() -> None:
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE rag_chunk, rag_document")


def unique(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(ids))


# --- baselines -----------------------------------------------------------------------------

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25:
    def __init__(self, texts: list[str], *, k1: float = 1.2, b: float = 0.75) -> None:
        self.docs = [Counter(words(t)) for t in texts]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avg = sum(self.lengths) / len(self.docs)
        frequency = Counter(term for d in self.docs for term in d)
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in frequency.items()}
        self.k1, self.b = k1, b

    def top(self, query: str, k: int) -> list[int]:
        terms = [t for t in set(words(query)) if t in self.idf]
        found = []
        for i, (d, length) in enumerate(zip(self.docs, self.lengths, strict=True)):
            norm = self.k1 * (1 - self.b + self.b * length / self.avg)
            score = sum(self.idf[t] * d[t] * (self.k1 + 1) / (d[t] + norm) for t in terms if t in d)
            if score:
                found.append((score, i))
        return [i for _, i in sorted(found, reverse=True)[:k]]


def windows(text: str, *, size: int = 200, overlap: int = 30) -> list[str]:
    """Fixed windows of ``size`` tokens (estimated: 1.3 per word), ``overlap`` shared."""
    tokens = text.split()
    step_words, size_words = int((size - overlap) / 1.3), int(size / 1.3)
    return [" ".join(tokens[i : i + size_words]) for i in range(0, max(1, len(tokens) - overlap), step_words)]


# --- the runs ------------------------------------------------------------------------------

Ranker = Callable[[str], Awaitable[list[str]]]


async def timed(ranker: Ranker, queries: list[str]) -> list[float]:
    """Milliseconds per query, one query at a time."""
    ms = []
    for query in queries:
        started = time.perf_counter()
        await ranker(query)
        ms.append((time.perf_counter() - started) * 1000)
    return ms


def latency(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {"p50_ms": round(statistics.median(ordered), 1), "p95_ms": round(ordered[int(len(ordered) * 0.95)], 1)}


@dataclass
class Ingested:
    """A corpus stored by the app's own ingestion, in a collection of its own."""

    collection: Collection
    source_of: dict[int, str]  # document pk -> the corpus's document id
    chunks: list[tuple[str, str, str, str]]  # (document id, title, heading, text)
    seconds: float


async def ingest(corpus: Corpus, embedder: CachedEmbeddings) -> Ingested:
    collection = await Collection.objects.acreate(name=f"eval-{corpus.name}")
    started = time.perf_counter()
    inputs = [docs.DocumentInput(text=d["text"], title=d["title"], source=d["id"]) for d in corpus.documents]
    await docs.aadd_documents(documents=inputs, embedder=embedder, collection=collection, concurrency=2)
    seconds = time.perf_counter() - started
    # As autovacuum would soon: without statistics the planner may scan exactly, and the
    # latency would depend on when it got round to it.
    await sync_to_async(analyze)()
    stored = Document.objects.filter(collection=collection).values_list("pk", "source")
    source_of = {pk: source async for pk, source in stored}
    chunks = [
        (source_of[doc], title, heading, text)
        async for doc, title, heading, text in Chunk.objects.filter(collection=collection).values_list(
            "document_id", "document__title", "heading", "text"
        )
    ]
    return Ingested(collection, source_of, chunks, seconds)


async def plain_dense_ranker(corpus: Corpus, embedder: CachedEmbeddings) -> tuple[Ranker, int]:
    """The plain-dense baseline's ranker, and how many windows it searches."""
    plain = [(d["id"], f"{d['title']}\n\n{w}") for d in corpus.documents for w in windows(d["text"])]
    matrix = np.asarray(await embedder.embed([text for _, text in plain]), dtype=np.float32)

    async def plain_dense(query: str, k: int = K_CHUNKS) -> list[str]:
        vector = np.asarray(json.loads((await embedder.embed_query(query)).literal), dtype=np.float32)
        best = np.argsort(-(matrix @ vector))[:k]
        return unique([plain[i][0] for i in best])

    return plain_dense, len(plain)


def app_ranker(stored: Ingested, embedder: CachedEmbeddings) -> Callable[..., Awaitable[list[str]]]:
    """The app's search, through ``retrieve`` as an answer calls it, with today's settings."""

    async def app(query: str, k: int = K_CHUNKS) -> list[str]:
        found = await retrieve(question=query, k=k, embedder=embedder, collections=[stored.collection.pk])
        return unique([stored.source_of[s.document_id] for s in found.sources])

    return app


async def evaluate(corpus: Corpus, embedder: CachedEmbeddings, weights: list[float]) -> dict:
    stored = await ingest(corpus, embedder)
    chunks = stored.chunks
    questions = [q["query"] for q in corpus.queries]
    answers = [q["answer"] for q in corpus.queries]
    rows: dict[str, dict] = {}

    def record(name: str, ranked: list[list[str]], ms: list[float] | None = None) -> None:
        rows[name] = {k: round(v, 3) for k, v in scores(ranked, answers).items()} | (latency(ms) if ms else {})

    bm25 = BM25([f"{title}\n{heading}\n{text}" for _, title, heading, text in chunks])
    record("BM25", [unique([chunks[i][0] for i in bm25.top(q, K_CHUNKS)]) for q in questions])

    plain_dense, windows_searched = await plain_dense_ranker(corpus, embedder)
    ranked = [await plain_dense(q) for q in questions]
    record("Plain dense (200-token windows, exact)", ranked, await timed(plain_dense, questions))

    app = app_ranker(stored, embedder)

    async def app_as_asked(query: str) -> list[str]:
        return await app(query, k=settings.RAG_DEFAULT_K)  # the latency of what an answer asks for

    names = ("RAG_DOCUMENT_WEIGHT", "RAG_HYBRID_WEIGHT", "RAG_DOCUMENT_CANDIDATES")
    defaults = {name: getattr(settings, name) for name in names}
    alone = {"RAG_DOCUMENT_WEIGHT": 0.0, "RAG_HYBRID_WEIGHT": 0.0, "RAG_DOCUMENT_CANDIDATES": 0}
    document_candidates = defaults["RAG_DOCUMENT_CANDIDATES"] or 10
    configurations = [
        ("The app, chunks alone", alone),
        ("The app, + document weight", {**alone, "RAG_DOCUMENT_WEIGHT": defaults["RAG_DOCUMENT_WEIGHT"]}),
        *[
            (f"The app, + document weight + full text {weight}", {**defaults, "RAG_HYBRID_WEIGHT": weight})
            for weight in sorted({defaults["RAG_HYBRID_WEIGHT"], *weights})
            if weight > 0
        ],
        (
            f"The app, + document weight + full text + {document_candidates} document candidates",
            {**defaults, "RAG_DOCUMENT_CANDIDATES": document_candidates},
        ),
    ]
    for name, values in configurations:
        for setting, value in values.items():
            setattr(settings, setting, value)
        await app_as_asked(questions[0])  # the first search compiles its SQL (and loads the model)
        ranked = [await app(q) for q in questions]
        default = values == defaults
        record(name + (" (default)" if default else ""), ranked, await timed(app_as_asked, questions))
    for setting, value in defaults.items():
        setattr(settings, setting, value)
    return {
        "corpus": corpus.name,
        "documents": len(corpus.documents),
        "answers": sum(d["kind"] == "answer" for d in corpus.documents),
        "queries": len(questions),
        "chunks": len(chunks),
        "plain_windows": windows_searched,
        "ingest_s": round(stored.seconds, 1),
        "rows": rows,
    }


async def evaluate_all(corpora: list[Corpus], embedder: CachedEmbeddings, weights: list[float]) -> list[dict]:
    # One event loop for all: the embedder's query batcher belongs to the loop it started on.
    return [await evaluate(corpus, embedder, weights) for corpus in corpora]


def write_markdown(result: dict) -> None:
    m = result["machine"]
    lines = [
        START,
        "### Retrieval quality on real documents (`bench/retrieval_eval.py`)",
        "",
        f"Measured {m['date']} on {m['cpu']} (nproc {m['nproc']}), Python {m['python']}, embedder "
        f"`{result['embedder']}`. Corpora built by `bench/eval_corpora.py` from Debian's documentation "
        "packages: each FAQ answer is a document with a neutral title, its question is the query, and "
        "unrelated pages are distractors. Documents rank by their best chunk; scores on the first ten.",
    ]
    for run in result["runs"]:
        lines += [
            "",
            f"**{run['corpus']}**: {run['queries']} queries, {run['documents']} documents "
            f"({run['answers']} answers), {run['chunks']} chunks in the app; ingested in {run['ingest_s']} s.",
            "",
            "| method | hit@1 | hit@5 | hit@10 | MRR@10 | nDCG@10 | latency p50 / p95 (k=4) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in run["rows"].items():
            timing = f"{row['p50_ms']} / {row['p95_ms']} ms" if "p50_ms" in row else "–"
            lines.append(
                f"| {name} | {row['hit@1']:.3f} | {row['hit@5']:.3f} | {row['hit@10']:.3f} | "
                f"{row['mrr@10']:.3f} | {row['ndcg@10']:.3f} | {timing} |"
            )
    lines.append(END)
    write_section(start=START, end=END, section="\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpora", nargs="*", default=["debian-faq", "python-faq", "git-faq"])
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    parser.add_argument(
        "--weights",
        type=lambda text: [float(w) for w in text.split(",")],
        default=[],
        help="More full-text weights to compare, e.g. 0.05,0.2 (the default always runs).",
    )
    args = parser.parse_args()
    corpora = [load(name) for name in args.corpora]

    with throwaway_database("rag_eval"):
        embedder = CachedEmbeddings(embedding_provider())
        runs = asyncio.run(evaluate_all(corpora, embedder, args.weights))
    result = {"machine": machine(), "embedder": embedder.model, "runs": runs}
    print(json.dumps(result, indent=2))
    if not args.no_write:
        write_markdown(result)


if __name__ == "__main__":
    main()
