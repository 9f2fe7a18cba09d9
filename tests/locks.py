"""Row locks taken and probed from connections of their own, for tests of lock order:
two transactions that lock the same answers in different orders can deadlock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg

from rag.answers import store
from rag.models import Message

_LOCK = f"SELECT 1 FROM {Message._meta.db_table} WHERE id = %s FOR NO KEY UPDATE"  # what an UPDATE takes


async def connect(*, autocommit: bool = False) -> psycopg.AsyncConnection:
    """A connection of its own to the tests' database, as the event log's writer has."""
    return await psycopg.AsyncConnection.connect(**store.connection_params(), autocommit=autocommit)


@asynccontextmanager
async def row_locked(message_id: int) -> AsyncIterator[None]:
    """Answer ``message_id``'s row stays locked, as an UPDATE would lock it, for the block."""
    async with await connect() as conn:
        await conn.execute(_LOCK, [message_id])
        yield
        await conn.rollback()


async def lockable(message_id: int) -> bool:
    """Whether answer ``message_id``'s row can be locked at once."""
    async with await connect() as conn:
        try:
            await conn.execute(_LOCK + " NOWAIT", [message_id])
        except psycopg.errors.LockNotAvailable:
            return False
        finally:
            await conn.rollback()
        return True


async def until_one_waits_for_a_lock() -> None:
    """Until a backend of this database waits for a lock (10 s at most)."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    async with asyncio.timeout(10), await connect(autocommit=True) as conn:
        while True:
            if (await (await conn.execute(query)).fetchone())[0]:
                return
            await asyncio.sleep(0.01)  # the poll interval of a condition wait
