"""How common each full-text lexeme is: the inverse document frequency of the full-text score.

Postgres counts it already. ANALYZE keeps, for the planner, the most common lexemes of a
tsvector column and the share of rows holding each (``pg_stats.most_common_elems`` and
``most_common_elem_freqs``; 1,000 lexemes at the default statistics target). Reading
``pg_stats`` costs about 2.5 ms (its arrays go through text), too much for every search,
so ``refresh`` copies them into ``rag_termfrequency`` (rag.models.TermFrequency), where a
search looks up its few words by primary key (rag.services.search_sql).

A lexeme missing from the statistics is rarer than every one kept: it counts with half
the smallest kept frequency, as the planner estimates it (the row with the empty lexeme).
"""

from __future__ import annotations

import logging
import threading
import time

from django.conf import settings
from django.db import DatabaseError, connection, transaction

logger = logging.getLogger(__name__)

# Any 64-bit number of our own: two processes refreshing at once take turns.
_LOCK_KEY = 0x7261675F74657266  # "rag_terf"

_COPY = """
INSERT INTO rag_termfrequency (lexeme, frequency)
SELECT DISTINCT ON (x.lexeme) x.lexeme, x.frequency
FROM pg_stats AS s,
     unnest(s.most_common_elems::text::text[], s.most_common_elem_freqs) AS x(lexeme, frequency)
WHERE s.schemaname = current_schema() AND s.tablename = 'rag_chunk' AND s.attname = 'search_vector'
  AND x.lexeme IS NOT NULL
ORDER BY x.lexeme, x.frequency DESC
"""
# most_common_elem_freqs ends with the smallest and largest frequency and the share of
# NULLs, after one frequency per element: hence "lexeme IS NOT NULL" above.
_FLOOR = "INSERT INTO rag_termfrequency (lexeme, frequency) SELECT '', min(frequency) / 2 FROM rag_termfrequency"

#: Refresh when this process has stored this share more chunks than the table held at the
#: last refresh: a new knowledge base gets statistics after its first documents, and a large
#: one refreshes rarely (about 50 times on the way from ten chunks to a million).
GROWTH = 0.25

_guard = threading.Lock()
_refreshed_at = float("-inf")
_chunks_then = 0  # the table's chunks at the last refresh (Postgres's estimate)
_stored_since = 0  # chunks this process stored since


def refresh() -> int:
    """Take fresh statistics of the chunks' full text and copy them; the lexemes kept."""
    global _refreshed_at, _chunks_then, _stored_since
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])
        # One column: the sample is read anyway, but no other column's statistics are computed.
        cursor.execute("ANALYZE rag_chunk (search_vector)")
        cursor.execute("DELETE FROM rag_termfrequency")
        cursor.execute(_COPY)
        kept = cursor.rowcount
        if kept:
            cursor.execute(_FLOOR)
        cursor.execute("SELECT reltuples FROM pg_class WHERE oid = 'rag_chunk'::regclass")
        [chunks] = cursor.fetchone()
    with _guard:
        _refreshed_at, _chunks_then, _stored_since = time.monotonic(), max(int(chunks), 0), 0
    logger.info("Full-text statistics: %d lexemes of %d chunks", kept, max(int(chunks), 0))
    return kept


def refresh_if_stale(*, stored: int) -> None:
    """``refresh`` after ``stored`` chunks were stored, if the table grew by GROWTH since the
    last refresh, or RAG_TERM_STATS_REFRESH_S passed: statistics follow a growing knowledge
    base, and a large one does not ANALYZE after every document."""
    global _stored_since
    with _guard:
        _stored_since += stored
        grown = _stored_since > GROWTH * _chunks_then
        due = time.monotonic() - _refreshed_at >= settings.RAG_TERM_STATS_REFRESH_S
        if not (grown or due):
            return
    refresh_or_warn()


def refresh_or_warn() -> None:
    """``refresh``, but a failure is logged, not raised: the chunks are stored whatever
    happens to the statistics (a database user that may not ANALYZE, say), and searches
    still score full text with the statistics they had."""
    try:
        refresh()
    except DatabaseError as exc:
        logger.warning("Could not refresh the full-text statistics (%s): searches keep the previous ones", exc)
