"""The app's retrieval statement over 100k and 1M synthetic 384-d chunks: latency and recall.

    python bench/scale_bench.py [--rows 100000,1000000] [--queries 200] [--no-write]

On a throwaway database, for each size: chunks are COPYed into the app's own table
(the full-text trigger fills their tsvectors), in 10 collections, with 5% of the
documents tagged ``rare``; the app's HNSW index is built as the app builds it; then
the app's own statement (rag.services.search_sql) is timed, one query at a time, for:

- dense (chunks alone), no filter; with a collection filter keeping 10%; with a metadata
  filter keeping 5%;
- the app's default scoring: the RAG_SEARCH_CANDIDATES nearest chunks, scored with their
  document's vector and BM25 (the settings' weights), alone and with the collection filter;
  and the same with the nearest chunk of each of the 10 nearest documents as candidates too
  (RAG_DOCUMENT_CANDIDATES);
- the same with 40 chunks holding the rare words of the question as candidates too
  (RAG_FULLTEXT_CANDIDATES);
- each at hnsw.ef_search 40, 100 and 200.

Latency is the round trip of that one statement on a warm server (planning and fetching
the k=10 rows included, the query's embedding not). Recall@10 is against an exact search
(NumPy) over the chunks the filter allows, for dense search (the scored rows rank by more
than the vector, so they have no exact counterpart). Vectors lie around a few thousand topic centres,
as embeddings of real text do; queries are points near those centres. Texts are words
drawn from a Zipf-like vocabulary of 5,000, so that full-text search has common and rare
terms to rank. Writes its table to docs/benchmarks.md between the scale-bench markers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ragsite.settings")

import django  # noqa: E402
from bench_env import machine, throwaway_database  # noqa: E402
from docs_section import write_section  # noqa: E402

django.setup()

import numpy as np  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402
from django.utils import timezone  # noqa: E402
from pgvector import Vector  # noqa: E402
from pgvector.psycopg.vector import register_vector_info  # noqa: E402
from psycopg.types import TypeInfo  # noqa: E402

from rag.models import Collection, Document  # noqa: E402
from rag.services import search_sql, term_stats, vector_index  # noqa: E402
from rag.services.metadata_filter import MetadataFilter  # noqa: E402
from rag.services.vector_index import ensure_vector_index, index_name  # noqa: E402

START, END = "<!-- scale-bench:start -->", "<!-- scale-bench:end -->"
DIM = 384
MODEL = "scale-bench-384"
K = 10
CHUNKS_PER_DOCUMENT = 100
COLLECTIONS = 10
EF_SEARCH = (40, 100, 200)
VOCABULARY = [f"w{i}" for i in range(5000)]


def unit(n: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def clustered(n: int, rng: np.random.Generator, centers: np.ndarray, noise: float = 0.6) -> np.ndarray:
    picked = centers[rng.integers(0, len(centers), n)]
    v = picked + noise * rng.standard_normal((n, DIM)).astype(np.float32) / np.sqrt(DIM)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def words(rng: np.random.Generator, n: int, count: int) -> list[str]:
    ranks = np.minimum(rng.zipf(1.3, (n, count)), len(VOCABULARY)) - 1
    return [" ".join(VOCABULARY[r] for r in row) for row in ranks]


def load(rows: int, rng: np.random.Generator, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Store ``rows`` chunks; returns their vectors, collection ids and whether each is rare."""
    collections = [Collection.objects.create(name=f"scale-{i}") for i in range(COLLECTIONS)]
    documents = rows // CHUNKS_PER_DOCUMENT
    doc_rare = [d % 20 == 7 for d in range(documents)]
    made = Document.objects.bulk_create(
        Document(
            collection=collections[d % COLLECTIONS],
            title=f"doc {d}",
            content="",
            content_hash=f"scale-{d}",
            metadata={"tag": "rare" if doc_rare[d] else "common"},
        )
        for d in range(documents)
    )
    doc_ids = [doc.pk for doc in made]
    doc_collection = [doc.collection_id for doc in made]
    vectors = clustered(rows, rng, centers)
    texts = words(rng, rows, 30)
    now = timezone.now()
    columns = "document_id, collection_id, position, text, heading, token_count, embedding, embedding_model, created_at"
    kinds = ["bigint", "bigint", "integer", "text", "varchar", "integer", "vector", "varchar", "timestamptz"]
    with connection.cursor() as cursor:
        raw = cursor.cursor
        register_vector_info(raw, TypeInfo.fetch(raw.connection, "vector"))
        copy_sql = f"COPY rag_chunk ({columns}) FROM STDIN (FORMAT BINARY)"
        for start in range(0, rows, 50_000):
            with raw.connection.transaction(), raw.copy(copy_sql) as copy:
                copy.set_types(kinds)
                for i in range(start, min(rows, start + 50_000)):
                    d = i // CHUNKS_PER_DOCUMENT
                    row = (doc_ids[d], doc_collection[d], i % CHUNKS_PER_DOCUMENT, texts[i], "", 30)
                    copy.write_row((*row, Vector(vectors[i]), MODEL, now))
    per_chunk = np.repeat(np.arange(documents), CHUNKS_PER_DOCUMENT)
    return vectors, np.asarray(doc_collection)[per_chunk], np.asarray(doc_rare)[per_chunk]


def _literal(vector: np.ndarray) -> str:
    """A batch of one query vector, as the app sends it (a text[] of vector literals)."""
    return '{"' + str(vector.tolist()) + '"}'


def timed(sql: str, params: tuple) -> tuple[float, list]:
    with connection.cursor() as cursor:
        started = time.perf_counter()
        cursor.execute(sql, params)
        rows = cursor.fetchall()
        return (time.perf_counter() - started) * 1000, rows


def run_size(rows: int, queries: int) -> dict:
    rng = np.random.default_rng(rows)
    centers = unit(max(rows // 200, 500), rng)
    started = time.perf_counter()
    vectors, chunk_collection, chunk_rare = load(rows, rng, centers)
    load_s = time.perf_counter() - started
    with connection.cursor() as cursor:
        cursor.execute("SET maintenance_work_mem = '3GB'")
        started = time.perf_counter()
        ensure_vector_index(embedding_model=MODEL, dimensions=DIM)
        build_s = time.perf_counter() - started
        cursor.execute("VACUUM ANALYZE rag_chunk")
        # What storing documents does: each document's mean vector, the words' statistics.
        cursor.execute(
            "INSERT INTO rag_documentvector (document_id, embedding_model, embedding) "
            "SELECT document_id, embedding_model, avg(embedding) FROM rag_chunk GROUP BY document_id, embedding_model"
        )
        cursor.execute("ANALYZE rag_documentvector")
        term_stats.refresh()
        cursor.execute("SELECT id FROM rag_chunk WHERE embedding_model = %s ORDER BY id", [MODEL])
        ids = np.asarray([r[0] for r in cursor.fetchall()])
        cursor.execute(
            "SELECT pg_size_pretty(pg_relation_size(%s)), pg_size_pretty(pg_total_relation_size('rag_chunk')), "
            "current_setting('shared_buffers')",
            [index_name(MODEL, DIM)],
        )
        index_size, table_size, shared_buffers = cursor.fetchone()
    first = int(chunk_collection.min())
    scored = {
        "candidates": settings.RAG_SEARCH_CANDIDATES,
        "document_weight": settings.RAG_DOCUMENT_WEIGHT,
        "lexical_weight": settings.RAG_HYBRID_WEIGHT,
        "document_candidates": settings.RAG_DOCUMENT_CANDIDATES,
    }
    matches = {**scored, "fulltext_candidates": 40}
    near_documents = {**scored, "document_candidates": settings.RAG_DOCUMENT_CANDIDATES or 10}
    default = f"default: {scored['candidates']} nearest chunks, document and BM25"
    with_documents = f"+ {near_documents['document_candidates']} document candidates"
    cases = {
        "dense": (None, None, np.ones(rows, bool), {}),
        "dense, collection filter (10%)": ((first,), None, chunk_collection == first, {}),
        "dense, metadata filter (5%)": (None, MetadataFilter.parse({"tag": "rare"}), chunk_rare, {}),
        default: (None, None, None, scored),
        "default, collection filter (10%)": ((first,), None, None, scored),
        with_documents: (None, None, None, near_documents),
        f"{with_documents}, collection filter (10%)": ((first,), None, None, near_documents),
        "+ full-text candidates": (None, None, None, matches),
        "+ full-text candidates, collection filter (10%)": ((first,), None, None, matches),
    }
    query_vectors = clustered(queries, rng, centers, noise=0.8)
    query_texts = words(rng, queries, 6)
    results = []
    for ef in EF_SEARCH:
        with connection.cursor() as cursor:
            cursor.execute(f"SET hnsw.ef_search = {ef}")
        for name, (shape, metadata, allowed, scoring) in cases.items():
            plan = search_sql.Plan(
                embedding_model=MODEL, dimensions=DIM, k=K, shape=shape, metadata=metadata, chunk_tokens=30, **scoring
            )
            sql, params = search_sql.statement(plan)
            timed(sql, (_literal(query_vectors[0]), [None], [query_texts[0]], *params))  # warm
            ms, hits = [], 0
            allowed_ids = ids[allowed] if allowed is not None else None
            allowed_vectors = vectors[allowed] if allowed is not None else None
            for q, text in zip(query_vectors, query_texts, strict=True):
                elapsed, found = timed(sql, (_literal(q), [None], [text], *params))
                ms.append(elapsed)
                if allowed_ids is not None:
                    truth = set(allowed_ids[np.argsort(-(allowed_vectors @ q))[:K]].tolist())
                    hits += len(truth & {row[1] for row in found})
            ordered = sorted(ms)
            results.append(
                {
                    "case": name,
                    "ef_search": ef,
                    "p50_ms": round(statistics.median(ordered), 2),
                    "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
                    "recall_at_10": round(hits / (queries * K), 3) if allowed_ids is not None else None,
                }
            )
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE rag_chunk, rag_document, rag_collection CASCADE")
        cursor.execute(f"DROP INDEX IF EXISTS {index_name(MODEL, DIM)}")
        cursor.execute(f"DROP INDEX IF EXISTS {index_name(MODEL, DIM, table='rag_documentvector')}")
    vector_index._ensured.discard((MODEL, DIM))  # the next size builds its own index
    return {
        "rows": rows,
        "load_s": round(load_s, 1),
        "index_build_s": round(build_s, 1),
        "index_size": index_size,
        "table_size": table_size,
        "shared_buffers": shared_buffers,
        "results": results,
    }


def write_markdown(result: dict) -> None:
    m = result["machine"]
    lines = [
        START,
        "### Retrieval at scale (`bench/scale_bench.py`)",
        "",
        f"Measured {m['date']} on {m['cpu']} (nproc {m['nproc']}), the embedded Postgres. The app's own "
        "search statement, one query at a time on a warm server, k=10; recall@10 against exact search over "
        "what the filter allows, for dense search (the scored rows have no exact counterpart). Synthetic "
        "clustered 384-d vectors; each document holds 100 chunks.",
    ]
    for size in result["sizes"]:
        lines += [
            "",
            f"**{size['rows']:,} chunks**, HNSW m={result['m']}, ef_construction={result['ef_construction']}: "
            f"loaded in {size['load_s']} s, index built in "
            f"{size['index_build_s']} s ({size['index_size']}; table and indexes {size['table_size']}; "
            f"shared_buffers {size['shared_buffers']}).",
            "",
            "| query | ef_search | p50 | p99 | recall@10 |",
            "|---|---|---|---|---|",
        ]
        for r in size["results"]:
            recall = "–" if r["recall_at_10"] is None else f"{r['recall_at_10']:.3f}"
            lines.append(f"| {r['case']} | {r['ef_search']} | {r['p50_ms']} ms | {r['p99_ms']} ms | {recall} |")
    lines.append(END)
    write_section(start=START, end=END, section="\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="100000,1000000", help="Comma-separated sizes.")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--m", type=int, default=settings.RAG_HNSW_M, help="HNSW m (RAG_HNSW_M).")
    parser.add_argument(
        "--ef-construction", type=int, default=settings.RAG_HNSW_EF_CONSTRUCTION, help="RAG_HNSW_EF_CONSTRUCTION."
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    settings.RAG_HNSW_M, settings.RAG_HNSW_EF_CONSTRUCTION = args.m, args.ef_construction
    with throwaway_database("rag_scale"):
        sizes = [run_size(int(rows), args.queries) for rows in args.rows.split(",")]
    result = {"machine": machine(), "m": args.m, "ef_construction": args.ef_construction, "sizes": sizes}
    print(json.dumps(result, indent=2))
    if not args.no_write:
        write_markdown(result)


if __name__ == "__main__":
    main()
