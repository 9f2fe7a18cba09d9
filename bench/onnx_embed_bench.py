"""The bundled MiniLM on ONNX Runtime (fp32 and int8) against PyTorch: speed and quality.

    python bench/eval_corpora.py debian-faq     # once
    python bench/onnx_embed_bench.py [--corpus debian-faq] [--no-write]

sentence-transformers' own ONNX backend needs optimum-onnx, whose releases pin
transformers below 4.58 while sentence-transformers 6 needs transformers 5, so the
model is exported as that backend does it, by the app's own exporter
(rag.providers.onnx_query: ``torch.onnx.export`` of the transformer, mean pooling and
normalisation after it), and onnxruntime's dynamic int8 quantisation for the int8 model.
Measured on the app's own chunks of a corpus:

- chunks per second, embedding all of them in batches of 32 (what ingestion does), and
  one query at a time (what a question waits for), on the same threads;
- retrieval quality with each model's vectors: exact cosine search over the chunks,
  documents ranked by their best chunk, hit@1/5/10 and MRR@10 as in retrieval_eval.

Writes its table to docs/benchmarks.md between the onnx-bench markers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ragsite.settings")
os.environ.setdefault("RAG_EMBEDDING_PROVIDER", "local")

import django  # noqa: E402
from docs_section import write_section  # noqa: E402

django.setup()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_env import machine  # noqa: E402
from django.conf import settings  # noqa: E402
from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: E402
from retrieval_eval import load, scores, unique  # noqa: E402

from rag.providers import onnx_query  # noqa: E402
from rag.providers.local import LocalEmbeddings  # noqa: E402
from rag.services.chunking import chunk_text  # noqa: E402

START, END = "<!-- onnx-bench:start -->", "<!-- onnx-bench:end -->"
BATCH = 32
THREADS = os.cpu_count() or 1


def export(model, folder: Path) -> tuple[Path, Path]:
    """The transformer as ONNX (fp32), as the app exports it, and its dynamic int8 quantisation."""
    fp32, int8 = folder / "model.onnx", folder / "model-int8.onnx"
    onnx_query.export(model, fp32)
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    return fp32, int8


def batched(encoder: onnx_query.OnnxQueryEncoder):
    """The app's ONNX encoder over batches of BATCH texts, as ingestion would embed them."""

    def encode(texts: list[str]) -> np.ndarray:
        return np.concatenate([encoder.encode(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)])

    return encode


def measure(encode, texts: list[str], queries: list[str]) -> dict:
    encode(texts[:BATCH])  # warm
    started = time.perf_counter()
    vectors = encode(texts)
    bulk_s = time.perf_counter() - started
    single = []
    for query in queries:
        started = time.perf_counter()
        encode([query])
        single.append((time.perf_counter() - started) * 1000)
    return {
        "vectors": vectors,
        "chunks_per_s": round(len(texts) / bulk_s, 1),
        "query_ms_p50": round(statistics.median(single), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="debian-faq")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    corpus = load(args.corpus)
    embedder = LocalEmbeddings()
    model = embedder._load()
    chunks: list[tuple[str, str]] = []  # (document id, text embedded)
    for d in corpus.documents:
        for draft in chunk_text(
            d["text"],
            max_tokens=settings.RAG_CHUNK_TOKENS,
            overlap=settings.RAG_CHUNK_OVERLAP,
            min_tokens=settings.RAG_CHUNK_MIN_TOKENS,
            count_tokens=embedder.count_tokens,
        ):
            chunks.append((d["id"], draft.embedding_text(d["title"])))
    texts = [text for _, text in chunks]
    questions = [q["query"] for q in corpus.queries]
    answers = [q["answer"] for q in corpus.queries]

    def torch_encode(batch: list[str]) -> np.ndarray:
        return model.encode(batch, batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True)

    with tempfile.TemporaryDirectory() as folder:
        fp32, int8 = export(model, Path(folder))
        backends = {
            "PyTorch (sentence-transformers)": torch_encode,
            "ONNX Runtime fp32": batched(onnx_query.OnnxQueryEncoder(fp32, model.tokenizer, model.max_seq_length)),
            "ONNX Runtime int8 (dynamic)": batched(
                onnx_query.OnnxQueryEncoder(int8, model.tokenizer, model.max_seq_length)
            ),
        }
        rows = {}
        for name, encode in backends.items():
            row = measure(encode, texts, questions)
            vectors = row.pop("vectors")
            query_vectors = encode(questions)
            ranked = [unique([chunks[i][0] for i in np.argsort(-(vectors @ q))[:40]]) for q in query_vectors]
            rows[name] = row | {k: round(v, 3) for k, v in scores(ranked, answers).items()}
    baseline = rows["PyTorch (sentence-transformers)"]
    for row in rows.values():
        row["speedup"] = round(row["chunks_per_s"] / baseline["chunks_per_s"], 2)
    result = {"machine": machine(), "corpus": args.corpus, "chunks": len(texts), "threads": THREADS, "rows": rows}
    print(json.dumps(result, indent=2))
    if not args.no_write:
        write_markdown(result)


def write_markdown(result: dict) -> None:
    m = result["machine"]
    lines = [
        START,
        "### The embedder on ONNX Runtime (`bench/onnx_embed_bench.py`)",
        "",
        f"Measured {m['date']} on {m['cpu']} (nproc {m['nproc']}), {result['threads']} threads, on the "
        f"{result['chunks']} chunks the app makes of `{result['corpus']}`: all of them embedded in batches "
        "of 32, then each query alone; quality from exact search with each model's own vectors.",
        "",
        "| backend | chunks/s | vs PyTorch | one query p50 | hit@1 | hit@5 | hit@10 | MRR@10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        lines.append(
            f"| {name} | {r['chunks_per_s']} | {r['speedup']}× | {r['query_ms_p50']} ms | {r['hit@1']:.3f} | "
            f"{r['hit@5']:.3f} | {r['hit@10']:.3f} | {r['mrr@10']:.3f} |"
        )
    lines.append(END)
    write_section(start=START, end=END, section="\n".join(lines))


if __name__ == "__main__":
    main()
