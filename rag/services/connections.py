"""Database connections of the worker threads that async code uses for the ORM."""

from __future__ import annotations

from django.db import connection


def release_connection() -> None:
    """Give this thread's connection back to the pool, unless a transaction (a test's,
    an outer atomic block) still needs it.

    A streaming answer can take a while, and the thread that ran its database work
    may not come back soon: holding the connection meanwhile would drain the pool
    under concurrent streams.
    """
    if not connection.in_atomic_block:
        connection.close()
