"""Database connections of the worker threads that async code uses for the ORM."""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.db import InterfaceError, OperationalError, connection

#: What a request that could not reach Postgres (down, restarting, failing over, or no pooled
#: connection free within RAG_DB_POOL_TIMEOUT) raises; it saved nothing, and trying again works.
UNREACHABLE_ERRORS = (OperationalError, InterfaceError)
UNREACHABLE = "The database cannot be reached right now, so nothing was saved. Try again in a few seconds."


def release_connection() -> None:
    """Give this thread's connection back to the pool, unless a transaction (a test's,
    an outer atomic block) still needs it.

    A streaming answer can take a while, and the thread that ran its database work
    may not come back soon: holding the connection meanwhile would drain the pool
    under concurrent streams.
    """
    if not connection.in_atomic_block:
        connection.close()


async def arelease_connection() -> None:
    """``release_connection`` for async code: the connection given back is the one held by
    the thread that this request's (or consumer's) ORM calls run in.

    Async ORM calls run in that thread and leave their connection open there, and a
    streaming response keeps the thread's connection until the stream ends: with a
    stream per client, 20 clients would hold the whole pool while they wait on the LLM.
    """
    await sync_to_async(release_connection)()
