"""The search's SQL: one statement for a batch of queries.

Each query of a batch is a row of ``unnest(vectors, readers, texts)``, and the search
runs once per row inside a LATERAL join, each through the HNSW index as it would on
its own (tests/test_db.py checks the plan).

- Chunks alone (both weights 0, no extra candidates): the k chunks nearest to the query vector.
- Scored (the default): the ``candidates`` nearest chunks, ordered by
  ``cosine similarity + document_weight * the document's cosine similarity
  + lexical_weight * BM25 / the best candidate's BM25``, the k best kept.
  - The document's vector is the mean of its chunks' (rag.models.DocumentVector): a chunk
    of a page about the question outranks one that only resembles it inside a long page
    about something else.
  - BM25 scores the question's lexemes (``to_tsvector``: stemmed, no stop words) in the
    chunk's tsvector, each weighted by its rarity (rag.services.term_stats). Postgres's
    ``ts_rank`` has no such weight, and did not help on the eval.
- ``fulltext_candidates`` adds that many chunks holding the question's rare words (under
  1% of chunks: codes, names, part numbers) to the candidates, ranked by ``ts_rank``
  through the GIN index: for what vectors miss. Common words are left out of that search:
  they would match most of a large table, and ranking every match was what made the first
  hybrid search take 5.5 s at 1M chunks. Off by default: on the eval it changed nothing,
  because a chunk the vectors did not find rarely wins at a small full-text weight.
- ``document_candidates`` adds the nearest chunk of each of that many documents nearest to
  the query (their vectors have an HNSW index too, and only documents with a chunk in scope
  count): an answer on a page about the question whose own chunks are not among the
  nearest. Off by default: it adds little on the eval (python-faq hit@10 0.960 against
  0.954, nothing elsewhere), and finding each document's nearest chunk made the search
  1.6-2x slower at 1M chunks.

The weights were chosen on one corpus of the eval (bench/retrieval_tune.py) and reported on
all of them (bench/retrieval_eval.py); docs/benchmarks.md has both.

The scope (the readable collections, and documents by metadata) is compiled by the
ORM from ``Chunk.objects.in_collections(...).matching(...)``, so the permission rules
stay in one place (rag.models); the SQL around it depends only on the ``Plan``, so it
is built once per plan and cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from django.db import DEFAULT_DB_ALIAS
from django.db.models import QuerySet

from rag.models import Chunk, Reader
from rag.services.metadata_filter import MetadataFilter

#: What a search's scope compiles from: a Reader (what it may read), collection ids,
#: or None for every collection. A Collection QuerySet is accepted too, uncached.
Shape = Reader | tuple[int, ...] | None

#: Stands in for the reader's user id while the ORM compiles the scope; the statement
#: takes it from the batch instead. No user has this id, and it fits a 32-bit id column
#: (out of range, the ORM would drop the condition).
READER_ID = -(2**31) + 1


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the statement depends on (hashable: statements are cached per plan)."""

    embedding_model: str
    dimensions: int
    k: int
    shape: Shape
    #: Weight of the full-text score (BM25 over the candidates, divided by the best one's);
    #: 0 leaves full text out.
    lexical_weight: float = 0.0
    #: Weight of the document's similarity (its vector: the mean of its chunks') added to
    #: each chunk's; 0 ranks chunks by their own similarity alone.
    document_weight: float = 0.0
    #: Nearest chunks taken before scoring (with a document or full-text weight).
    candidates: int = 40
    #: Chunks holding the question's rare words added to the candidates; 0: none.
    fulltext_candidates: int = 0
    #: The nearest chunk of each of this many documents nearest to the question (by their
    #: vectors) added to the candidates; 0: none.
    document_candidates: int = 0
    #: The chunk length BM25 weighs a chunk's word counts against (RAG_CHUNK_TOKENS).
    chunk_tokens: int = 250
    #: Postgres text-search configuration the question's words are read with.
    text_search_config: str = "english"
    #: Only chunks of documents whose metadata matches.
    metadata: MetadataFilter | None = None


def statement(plan: Plan, queryset_scope: QuerySet | None = None) -> tuple[str, tuple]:
    """The batched search for ``plan``, and its parameters after the batch's three arrays
    (vectors, readers, texts). Each result row: (query number from 1, chunk id, document
    id, title, source, heading, text, cosine distance), in rank order per query.

    Compiling the ORM's part costs ~0.8 ms of CPU, as much as a search takes in Postgres,
    and every first token waited for it: hence the cache. A Collection QuerySet as the
    scope (``queryset_scope``) is not hashable, so that one is compiled each time.
    """
    if queryset_scope is not None:
        return _build(plan, queryset_scope)
    return _cached(plan)


@functools.lru_cache(maxsize=512)
def _cached(plan: Plan) -> tuple[str, tuple]:
    return _build(plan, None)


def _build(plan: Plan, queryset_scope: QuerySet | None) -> tuple[str, tuple]:
    where, where_params = _scope(plan, queryset_scope)
    distance = _distance("rag_chunk", plan.dimensions)
    batch = "unnest(%s::text[]::vector[], %s::bigint[], %s::text[]) WITH ORDINALITY AS q(vector, reader, text, i)"
    if (
        plan.lexical_weight <= 0
        and plan.document_weight <= 0
        and plan.fulltext_candidates <= 0
        and plan.document_candidates <= 0
    ):
        sql = (
            f"SELECT q.i, r.id, r.document_id, d.title, d.source, r.heading, r.text, r.distance FROM {batch} "
            "CROSS JOIN LATERAL ("
            f"SELECT rag_chunk.id, rag_chunk.document_id, rag_chunk.heading, rag_chunk.text, {distance} AS distance "
            f"FROM rag_chunk WHERE {where} ORDER BY {distance} LIMIT {int(plan.k)}"
            ") AS r JOIN rag_document d ON d.id = r.document_id ORDER BY q.i, r.distance"
        )
        return sql, tuple(where_params)

    # 1. The candidates: (id, distance), the distance NULL for a full-text match only.
    n = max(int(plan.candidates), int(plan.k))
    candidates = (
        f"SELECT rag_chunk.id, {distance} AS distance FROM rag_chunk WHERE {where} ORDER BY {distance} LIMIT {n}"
    )
    params = list(where_params)
    extra: list[str] = []
    if plan.document_candidates > 0:
        # The documents nearest to the question that have a chunk in scope (through their
        # own HNSW index, rag.services.vector_index), and the nearest such chunk of each.
        # "+ 0" orders a document's chunks by an expression the chunks' HNSW index does not
        # hold, so that they are read through the document's own index, not the graph.
        in_scope = f"SELECT 1 FROM rag_chunk WHERE {where} AND rag_chunk.document_id = v.document_id"
        extra.append(
            "SELECT b.id, b.distance FROM ("
            f"SELECT v.document_id FROM rag_documentvector v WHERE v.embedding_model = %s AND EXISTS ({in_scope}) "
            f"ORDER BY {_distance('v', plan.dimensions)} LIMIT {int(plan.document_candidates)}"
            ") AS nd CROSS JOIN LATERAL ("
            f"SELECT rag_chunk.id, {distance} AS distance FROM rag_chunk "
            f"WHERE {where} AND rag_chunk.document_id = nd.document_id ORDER BY ({distance}) + 0 LIMIT 1"
            ") AS b"
        )
        params += [plan.embedding_model, *where_params, *where_params]
    if plan.fulltext_candidates > 0:
        matches = (
            "SELECT rag_chunk.id, NULL::float8 FROM rag_chunk "
            f"WHERE {where} AND rag_chunk.search_vector @@ qt.rare "
            f"ORDER BY ts_rank(rag_chunk.search_vector, qt.rare) DESC LIMIT {int(plan.fulltext_candidates)}"
        )
        extra.append(matches)
        params += where_params
    if extra:
        union = " UNION ALL ".join(f"({part})" for part in [candidates, *extra])
        candidates = f"SELECT id, min(distance) AS distance FROM ({union}) AS u GROUP BY id"

    # 2. What each candidate scores with: its distance, its document's, its full-text score.
    d = int(plan.dimensions)
    features = [f"coalesce(m.distance, {_distance('c', d)}) AS distance"]
    join = ""
    if plan.document_weight > 0:
        features.append(f"{_distance('v', d)} AS document_distance")
        join = "LEFT JOIN rag_documentvector v ON v.document_id = c.document_id AND v.embedding_model = %s "
        params.append(plan.embedding_model)
    if plan.lexical_weight > 0:
        features.append(_BM25.format(length=int(plan.chunk_tokens)) + " AS text_score")
    # OFFSET 0 keeps the pool a subquery of its own: pulled up into the score, BM25 was
    # computed twice per candidate, once for the score and once for its best (python-faq,
    # 60 queries: 3.4-4.8 ms per statement p50 without it, 2.4-2.6 ms with it).
    pool = (
        f"SELECT c.id, c.document_id, {', '.join(features)} "
        f"FROM ({candidates}) AS m JOIN rag_chunk c ON c.id = m.id {join}OFFSET 0"
    )

    # 3. The score.
    score = "(1 - p.distance)"
    if plan.document_weight > 0:
        # A document without its vector yet (stored a moment later) counts as its chunk.
        score += f" + {float(plan.document_weight)!r} * (1 - coalesce(p.document_distance, p.distance))"
    if plan.lexical_weight > 0:
        score += f" + {float(plan.lexical_weight)!r} * coalesce(p.text_score / nullif(max(p.text_score) OVER (), 0), 0)"
    terms = ""
    if plan.lexical_weight > 0 or plan.fulltext_candidates > 0:
        # The question's words, once per query, before its candidates are chosen and scored.
        terms = f"CROSS JOIN LATERAL ({_QUERY_TERMS}) AS qt(lexemes, idfs, rare) "
        params.insert(0, plan.text_search_config)  # the statement's first placeholder
    sql = (
        f"SELECT q.i, r.id, r.document_id, d.title, d.source, c.heading, c.text, r.distance FROM {batch} {terms}"
        "CROSS JOIN LATERAL ("
        f"SELECT p.id, p.document_id, p.distance, {score} AS score FROM ({pool}) AS p "
        f"ORDER BY score DESC LIMIT {int(plan.k)}"
        ") AS r JOIN rag_chunk c ON c.id = r.id JOIN rag_document d ON d.id = r.document_id "
        "ORDER BY q.i, r.score DESC"
    )
    return sql, tuple(params)


# The question's lexemes (stemmed, without stop words); the inverse document frequency of
# each, -ln(share of chunks holding it), from rag.services.term_stats (a lexeme rarer than
# all those kept counts with the floor row '', and 1% before any statistics exist); and the
# rare ones ORed, for full-text candidates: a lexeme missing from the statistics, or held
# by under 1% of chunks. Rare words are what vectors miss (codes, names), and a GIN search
# for them stays cheap however large the table: common words would match most of it.
_QUERY_TERMS = (
    "SELECT coalesce(array_agg(w.lexeme), '{}'), "
    "coalesce(array_agg(-ln(greatest(coalesce(f.frequency, floor.frequency, 0.01), 1e-9))), '{}'), "
    # Each lexeme quoted as tsquery input quotes it (backslash and quote escaped), so that
    # no character of it reads as an operator.
    "string_agg('''' || replace(replace(w.lexeme, '\\', '\\\\'), '''', '''''') || '''', ' | ') "
    "FILTER (WHERE coalesce(f.frequency, 0) < 0.01)::tsquery "
    "FROM unnest(to_tsvector(%s::regconfig, q.text)) AS w "
    "LEFT JOIN rag_termfrequency f ON f.lexeme = w.lexeme "
    "LEFT JOIN rag_termfrequency floor ON floor.lexeme = ''"
)
# Okapi BM25 (k1 1.2, b 0.75) of the chunk's tsvector (title, heading path and text) for the
# question's lexemes: each word's IDF times its count, saturating, the count relative to the
# chunk's length (its tokens, against the RAG_CHUNK_TOKENS chunks are cut to, as the
# average length BM25 wants: most chunks are near it, and the true average costs a pass).
# The chunk's tsvector is cut to the question's lexemes before it is unnested (marked 'A'
# by setweight, kept by ts_filter, both in C): unnesting whole tsvectors took the scoring
# of 40 candidates from 1.1 to 2.2 ms per query on python-faq.
_BM25 = (
    "(SELECT coalesce(sum(w.idf * x.tf * 2.2 / (x.tf + 1.2 * (0.25 + 0.75 * c.token_count / {length}.0))), 0) "
    "FROM (SELECT u.lexeme, coalesce(array_length(u.positions, 1), 1) AS tf "
    "FROM unnest(ts_filter(setweight(setweight(c.search_vector, 'D'), 'A', qt.lexemes), '{{a}}')) AS u) AS x "
    "JOIN unnest(qt.lexemes, qt.idfs) AS w(lexeme, idf) ON w.lexeme = x.lexeme)"
)


def _distance(table: str, dimensions: int) -> str:
    # Written as the HNSW index's expression (rag.services.vector_index), so that the
    # planner can order by the index.
    d = int(dimensions)
    return f"{table}.embedding::vector({d}) <=> q.vector::vector({d})"


def _scope(plan: Plan, queryset_scope: QuerySet | None) -> tuple[str, list]:
    """The WHERE clause that keeps one model's chunks in the readable collections (and the
    documents the metadata filter keeps), as the ORM writes it, with the reader's user id
    taken from the batch."""
    queryset = (
        Chunk.objects.in_collections(queryset_scope if queryset_scope is not None else plan.shape)
        .matching(plan.metadata.jsonpath if plan.metadata else None)
        .for_model(plan.embedding_model)
    )
    sql, params = queryset.query.get_compiler(using=DEFAULT_DB_ALIAS).compile(queryset.query.where)
    # The ORM's SQL has a %s per parameter (a literal percent sign would be %%).
    pieces = sql.split("%s")
    if len(pieces) != len(params) + 1:
        raise RuntimeError(f"Unexpected placeholders in {sql!r}")
    where, kept = pieces[0], []
    for param, piece in zip(params, pieces[1:], strict=True):
        if isinstance(param, int) and not isinstance(param, bool) and param == READER_ID:
            where += "q.reader" + piece
        else:
            kept.append(param)
            where += "%s" + piece
    return where, kept
