"""One LISTEN connection per process, shared by all its streams.

Two channels:

- ``rag_answer_events`` (rag.answers.store sends it with every flush): a stream that
  follows an answer generated in another process wakes up and reads the new events.
  A thousand waiting streams cost one connection, not a thousand.
- ``rag_answer_stop``: Stop pressed in any process reaches the one generating the
  answer, which cancels it (closing the upstream LLM request).

If the connection drops, it is opened again and every follower is woken to re-read
what it may have missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import weakref
from collections import defaultdict

import psycopg
from asgiref.sync import sync_to_async
from django.db import connection

from rag.answers import live
from rag.answers.store import EVENTS_CHANNEL, connection_params
from rag.services.connections import release_connection

logger = logging.getLogger(__name__)

STOP_CHANNEL = "rag_answer_stop"
RECONNECT_S = 1.0


class Listener:
    def __init__(self) -> None:
        self._followers: dict[int, set[asyncio.Event]] = defaultdict(set)
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None
        #: The Postgres backend of the listening connection (diagnostics, and tests that kill it).
        self.backend_pid: int | None = None

    async def start(self) -> None:
        if self._task is None or self._task.done():
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run(), context=contextvars.Context())
        await self._ready.wait()

    async def aclose(self) -> None:
        """Stop listening and close the connection (``start`` opens it again)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        self._ready.clear()

    def follow(self, answer_id: int) -> asyncio.Event:
        """An event set whenever ``answer_id`` has new events stored."""
        wake = asyncio.Event()
        self._followers[answer_id].add(wake)
        return wake

    def unfollow(self, answer_id: int, wake: asyncio.Event) -> None:
        followers = self._followers.get(answer_id)
        if followers is not None:
            followers.discard(wake)
            if not followers:
                del self._followers[answer_id]

    async def _run(self) -> None:
        failures = 0  # in a row: the first reconnects at once, as a Stop sent meanwhile is lost
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(**connection_params(), autocommit=True) as conn:
                    await conn.execute(f"LISTEN {EVENTS_CHANNEL}")
                    await conn.execute(f"LISTEN {STOP_CHANNEL}")
                    self.backend_pid = conn.info.backend_pid
                    self._ready.set()
                    failures = 0
                    self._wake_all()  # whatever was stored while this connection was down
                    async for note in conn.notifies():
                        self._dispatch(note.channel, note.payload)
            except (psycopg.Error, OSError) as exc:
                logger.warning("The LISTEN connection failed (%s); opening it again", exc)
            if failures:
                await asyncio.sleep(RECONNECT_S)  # Postgres is down: do not spin
            failures += 1

    def _dispatch(self, channel: str, payload: str) -> None:
        if channel == STOP_CHANNEL:
            if payload.isdigit():
                live.stop(int(payload))
            return
        for part in payload.split():
            answer_id = part.partition(":")[0]
            if answer_id.isdigit():
                for wake in self._followers.get(int(answer_id), ()):
                    wake.set()

    def _wake_all(self) -> None:
        for followers in self._followers.values():
            for wake in followers:
                wake.set()


_listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Listener] = weakref.WeakKeyDictionary()


async def listener() -> Listener:
    """This process's listener, connected."""
    loop = asyncio.get_running_loop()
    if loop not in _listeners:
        _listeners[loop] = Listener()
    found = _listeners[loop]
    await found.start()
    return found


async def aclose() -> None:
    """Close this event loop's listener, if it has one."""
    found = _listeners.get(asyncio.get_running_loop())
    if found is not None:
        await found.aclose()


@sync_to_async
def publish_stop(answer_id: int) -> None:
    """Ask whichever process generates ``answer_id`` to stop it."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [STOP_CHANNEL, str(answer_id)])
    finally:
        release_connection()
