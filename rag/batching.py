"""Concurrent calls run as batches, with no timer ("natural batching").

Under a burst of questions, each one embedding its query and later saving its
answer costs a request (or a statement) of its own, and on one event loop those
fixed costs queue up in front of everybody's first token. A Batcher runs
``run(items)`` over whatever was submitted while earlier batches were in flight:

* a lone call starts at once, so nothing waits that would not have waited anyway;
* calls arriving while ``concurrency`` batches are running wait for the next one;
* one slow or hung batch does not hold up the rest (``concurrency`` > 1).

A batch belongs to no caller: sync code in ``run`` must not rely on a caller's
thread (use ``sync_to_async(thread_sensitive=False)``).
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Queue(Generic[T, R]):
    items: list[tuple[T, asyncio.Future[R]]] = field(default_factory=list)
    running: int = 0
    workers: set[asyncio.Task[None]] = field(default_factory=set)


class Batcher(Generic[T, R]):
    """``await batcher.submit(item)`` → ``run([..., item, ...])``'s result for ``item``.

    ``run`` returns one result per item, in order. When a batch of several items
    fails with an exception for which ``split(exc)`` is true (one bad item may
    have failed it), each item is retried on its own so the others still
    succeed; otherwise every caller of the batch gets the exception.

    A caller that stops waiting (cancelled) is dropped from batches not yet
    started, unless ``keep_abandoned``: then its item still runs (an answer is
    saved even when the client that streamed it has gone).
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_size: int,
        concurrency: int = 2,
        split: Callable[[BaseException], bool] = lambda exc: False,
        keep_abandoned: bool = False,
    ) -> None:
        if max_size < 1 or concurrency < 1:
            raise ValueError("max_size and concurrency must be at least 1")
        self._run = run
        self._max_size = max_size
        self._concurrency = concurrency
        self._split = split
        self._keep_abandoned = keep_abandoned
        # Futures and tasks belong to one event loop; tests and commands run several.
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue[T, R]] = weakref.WeakKeyDictionary()

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = _Queue()
        future: asyncio.Future[R] = loop.create_future()
        queue.items.append((item, future))
        if queue.running < self._concurrency:
            queue.running += 1
            # A context of its own: the worker serves many callers and may outlive
            # the one that started it (a request's context, whose thread executor
            # ends with the request).
            worker = loop.create_task(self._drain(queue), context=contextvars.Context())
            queue.workers.add(worker)  # a strong reference until it is done
            worker.add_done_callback(queue.workers.discard)
        # The item is queued before the first await: a caller cancelled from
        # here on cannot take back an item that ``keep_abandoned`` keeps.
        return await future

    async def _drain(self, queue: _Queue[T, R]) -> None:
        try:
            while queue.items:
                batch, queue.items = queue.items[: self._max_size], queue.items[self._max_size :]
                if not self._keep_abandoned:
                    batch = [(item, future) for item, future in batch if not future.done()]
                if batch:
                    await self._run_batch(batch)
        finally:
            queue.running -= 1

    async def _run_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} items returned {len(results)} results")
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            if len(batch) > 1 and self._split(exc):
                await asyncio.gather(*(self._run_batch([one]) for one in batch))
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
