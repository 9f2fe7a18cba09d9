"""The answers being generated in this process, with their events in memory.

A generation runs in a task of its own, not in the request that started it: closing the
tab does not stop the answer (Stop does, from any process, and so does the LLM timeout).
Its events go to memory, where the streams of this process follow it with no database
read, and to the batched writer (rag.answers.store), where other processes find them.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any

from rag.answers import store
from rag.answers.events import LogEvent, text_of

logger = logging.getLogger(__name__)


class Live:
    def __init__(self, answer_id: int, key: str, asker: Hashable | None = None) -> None:
        self.answer_id = answer_id
        self.key = key
        #: Who asked, as the transport that started it knows them: its own streams may
        #: then skip the database to check who is reading.
        self.asker = asker
        self.events: list[LogEvent] = []
        self.task: asyncio.Task | None = None
        #: Set when Stop cancelled the task (rather than the process shutting down).
        self.stopping = False
        self._wake = asyncio.Event()

    @property
    def finished(self) -> bool:
        return bool(self.events) and self.events[-1].terminal

    def append(self, kind: str, data: Any) -> LogEvent:
        event = LogEvent(self.answer_id, self.key, len(self.events) + 1, kind, data)
        self.events.append(event)
        store.writer().append(event)
        # Wake every follower; the next ones wait on a new event.
        self._wake.set()
        self._wake = asyncio.Event()
        return event

    def text(self) -> str:
        return text_of(self.events)

    async def follow(self, *, after: int) -> AsyncIterator[LogEvent]:
        """The events after ``after``, then each new one as it comes, to the end."""
        seen = after
        while not (self.finished and seen >= len(self.events)):
            wake = self._wake
            while seen < len(self.events):
                event = self.events[seen]
                seen += 1
                yield event
                if event.terminal:
                    return
            await wake.wait()


_running: dict[int, Live] = {}


def get(answer_id: int) -> Live | None:
    return _running.get(answer_id)


def start(answer_id: int, key: str, run: Callable[[Live], Awaitable[None]], *, asker: Hashable | None = None) -> Live:
    """Run ``run(live)`` as this process's generation of ``answer_id`` (public id ``key``)."""
    live = Live(answer_id, key, asker)
    _running[answer_id] = live

    async def main() -> None:
        try:
            # Its sync ORM work runs on threads that belong to no request (thread_sensitive=False):
            # the request that started it may end long before it does, and a thread of its
            # own per answer cost its start-up on the event loop at every question.
            await run(live)
            await store.writer().flushed()  # followers elsewhere find the end before it leaves memory
        except Exception:
            logger.exception("The generation of answer %d failed", answer_id)
        finally:
            _running.pop(answer_id, None)

    live.task = asyncio.get_running_loop().create_task(main(), context=contextvars.Context())
    return live


def stop(answer_id: int) -> bool:
    """Cancel this process's generation of ``answer_id``; False if it has none running."""
    live = _running.get(answer_id)
    if live is None or live.task is None or live.task.done() or live.finished:
        return False
    if not live.stopping:
        live.stopping = True
        live.task.cancel()
    return True


async def wait_idle() -> None:
    """Until no generation runs in this process and all their events are written."""
    while _running:
        tasks = [live.task for live in list(_running.values()) if live.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
    await store.writer().flushed()


def running() -> dict[int, Live]:
    """The generations running now (for tests and diagnostics)."""
    return dict(_running)
