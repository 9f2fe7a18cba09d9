"""Choose search's weights on one corpus; bench/retrieval_eval.py then reports them on all.

    python bench/eval_corpora.py                  # once: builds var/eval/<corpus>/
    python bench/retrieval_tune.py [corpus] [--no-write]   # python-faq by default

Every setting of a grid of RAG_SEARCH_CANDIDATES, RAG_DOCUMENT_CANDIDATES,
RAG_DOCUMENT_WEIGHT and RAG_HYBRID_WEIGHT ranks the corpus's
questions through the app's own ``retrieve``, as bench/retrieval_eval.py does, and is
compared with plain dense search on the same corpus. The best setting is the one whose
worst metric beats plain dense by the most, then the largest sum of margins: a setting
that wins on four metrics and loses one is worse than one that wins a little on all five.

The shipped defaults (ragsite/settings.py) were chosen this way on python-faq alone, the
largest corpus, among the settings without document candidates (they are slow at scale);
where several tie on the worst margin, the one kept is not the tie-break's first but the
earlier weights (docs/benchmarks.md says why). Prints JSON; writes the best settings to
docs/benchmarks.md between the retrieval-tune markers.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_env import machine, throwaway_database
from django.conf import settings
from docs_section import write_section
from retrieval_eval import (
    METRICS,
    CachedEmbeddings,
    app_ranker,
    ingest,
    load,
    plain_dense_ranker,
    scores,
)

from rag.providers import QueryVector, embedding_provider  # after retrieval_eval, which sets Django up

START, END = "<!-- retrieval-tune:start -->", "<!-- retrieval-tune:end -->"
GRID = {
    "RAG_SEARCH_CANDIDATES": [40, 60, 100],
    "RAG_DOCUMENT_CANDIDATES": [0, 10],
    "RAG_DOCUMENT_WEIGHT": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0],
    "RAG_HYBRID_WEIGHT": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
}
SHOWN = 10


class QueriesOnce(CachedEmbeddings):
    """Each question embedded once for the whole grid: only the ranking is measured here."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.queries: dict[str, QueryVector] = {}

    async def embed_query(self, text: str) -> QueryVector:
        if text not in self.queries:
            self.queries[text] = await self.inner.embed_query(text)
        return self.queries[text]


def margins(row: dict[str, float], baseline: dict[str, float]) -> tuple[float, float]:
    differences = [row[m] - baseline[m] for m in METRICS]
    return min(differences), sum(differences)


async def tune(corpus_name: str) -> dict:
    corpus = load(corpus_name)
    embedder = QueriesOnce(embedding_provider())
    questions = [q["query"] for q in corpus.queries]
    answers = [q["answer"] for q in corpus.queries]
    stored = await ingest(corpus, embedder)
    plain_dense, _ = await plain_dense_ranker(corpus, embedder)
    baseline = scores([await plain_dense(q) for q in questions], answers)
    app = app_ranker(stored, embedder)
    names = list(GRID)
    original = {name: getattr(settings, name) for name in names}
    tried = []
    try:
        for values in itertools.product(*GRID.values()):
            setting = dict(zip(names, values, strict=True))
            for name, value in setting.items():
                setattr(settings, name, value)
            row = scores([await app(q) for q in questions], answers)
            worst, total = margins(row, baseline)
            tried.append({"setting": setting, "scores": row, "worst_margin": worst, "sum_margin": total})
    finally:
        for name, value in original.items():
            setattr(settings, name, value)
    tried.sort(key=lambda t: (t["worst_margin"], t["sum_margin"]), reverse=True)
    shipped = next(t for t in tried if t["setting"] == original)
    # Document candidates read every chunk of each proposed document: at scale they cost
    # more than the rest of the search (docs/benchmarks.md), so the best setting without
    # them is reported apart.
    cheap = [t for t in tried if not t["setting"]["RAG_DOCUMENT_CANDIDATES"]]
    return {
        "corpus": corpus_name,
        "queries": len(questions),
        "settings_tried": len(tried),
        "plain_dense": baseline,
        "best": tried[:SHOWN],
        "best_without_document_candidates": cheap[:SHOWN],
        "shipped": shipped,
        "shipped_rank": tried.index(shipped) + 1,
        "shipped_rank_without_document_candidates": cheap.index(shipped) + 1 if shipped in cheap else None,
    }


def write_markdown(result: dict) -> None:
    m, run = result["machine"], result["run"]
    header = [
        "| nearest chunks / document candidates / document weight / full-text weight "
        "| hit@1 | hit@5 | hit@10 | MRR@10 | nDCG@10 |",
        "|---|---|---|---|---|---|",
    ]

    def line(name: str, row: dict) -> str:
        return f"| {name} | " + " | ".join(f"{row[metric]:.3f}" for metric in METRICS) + " |"

    def table(rows: list[dict]) -> list[str]:
        lines = [*header, line("Plain dense (the baseline)", run["plain_dense"])]
        for tried in rows:
            name = " / ".join(str(v) for v in tried["setting"].values())
            lines.append(line(name + (" (the defaults)" if tried == run["shipped"] else ""), tried["scores"]))
        return lines

    cheap_rank = run["shipped_rank_without_document_candidates"]
    lines = [
        START,
        "### Choosing the search's weights (`bench/retrieval_tune.py`)",
        "",
        f"Measured {m['date']} on {m['cpu']} (nproc {m['nproc']}). {run['settings_tried']} settings of the "
        "nearest chunks taken, the document candidates, the document weight and the full-text weight, each "
        f"over the {run['queries']} questions of **{run['corpus']}** only, through the app's own search; the "
        "best is the one whose worst metric beats plain dense search by the most. The other corpora were "
        "not used to choose: their figures are the retrieval-eval table's. "
        f"The defaults are the {_ordinal(run['shipped_rank'])} of all"
        + (f", the {_ordinal(cheap_rank)} without document candidates." if cheap_rank else ".")
        + " The best of all:",
        "",
        *table(run["best"]),
        "",
        "The best without document candidates (they read every chunk of each document they propose, "
        "which costs more than the rest of the search on a large knowledge base):",
        "",
        *table(run["best_without_document_candidates"]),
        END,
    ]
    write_section(start=START, end=END, section="\n".join(lines))


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", nargs="?", default="python-faq")
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    args = parser.parse_args()
    with throwaway_database("rag_tune"):
        run = asyncio.run(tune(args.corpus))
    result = {"machine": machine(), "run": run}
    print(json.dumps(result, indent=2))
    if not args.no_write:
        write_markdown(result)


if __name__ == "__main__":
    main()
