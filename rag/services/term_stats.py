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
from django.db import connection, transaction

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

_refreshed_at = float("-inf")
_guard = threading.Lock()


def refresh() -> int:
    """Take fresh statistics of the chunks' full text and copy them; the lexemes kept."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])
        # One column: the sample is read anyway, but no other column's statistics are computed.
        cursor.execute("ANALYZE rag_chunk (search_vector)")
        cursor.execute("DELETE FROM rag_termfrequency")
        cursor.execute(_COPY)
        kept = cursor.rowcount
        if kept:
            cursor.execute(_FLOOR)
    logger.info("Full-text statistics: %d lexemes", kept)
    return kept


def refresh_if_stale() -> None:
    """``refresh`` at most once every RAG_TERM_STATS_REFRESH_S in this process: called
    after chunks are stored, so that a new knowledge base gets its statistics at once and
    a large one does not ANALYZE after every document."""
    global _refreshed_at
    with _guard:
        if time.monotonic() - _refreshed_at < settings.RAG_TERM_STATS_REFRESH_S:
            return
        _refreshed_at = time.monotonic()
    refresh()


def forget_refresh() -> None:
    """Let the next ``refresh_if_stale`` run (tests, and a bulk load that ended)."""
    global _refreshed_at
    with _guard:
        _refreshed_at = float("-inf")
