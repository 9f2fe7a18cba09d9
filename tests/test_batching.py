"""rag.batching.Batcher: concurrent calls coalesced into batches, each caller gets its own result."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async

from rag.batching import Batcher


class Recorder:
    """A ``run`` that records its batches; ``gate`` holds every batch until set."""

    def __init__(self, *, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_on = fail_on

    async def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        await self.gate.wait()
        if self.fail_on in items:
            raise ValueError(f"bad item in {items}")
        return [item.upper() for item in items]


async def started(recorder: Recorder, batches: int) -> None:
    # Each check yields to the loop, so the batches already due get to start.
    for _ in range(100):
        if len(recorder.batches) >= batches:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"expected {batches} batches, saw {recorder.batches}")


async def test_a_lone_call_runs_at_once_as_a_batch_of_one():
    run = Recorder()
    batcher = Batcher(run, max_size=10)
    assert await batcher.submit("a") == "A"
    assert await batcher.submit("b") == "B"
    assert run.batches == [["a"], ["b"]]


async def test_calls_arriving_during_a_batch_share_the_next_one():
    run = Recorder()
    run.gate.clear()
    batcher = Batcher(run, max_size=10, concurrency=1)
    first = asyncio.ensure_future(batcher.submit("a"))
    await started(run, 1)
    rest = [asyncio.ensure_future(batcher.submit(x)) for x in "bcdef"]
    run.gate.set()
    assert await first == "A"
    assert await asyncio.gather(*rest) == list("BCDEF")  # each caller gets its own result
    assert run.batches == [["a"], list("bcdef")]


async def test_batches_are_capped_and_run_side_by_side_up_to_the_concurrency():
    run = Recorder()
    run.gate.clear()
    batcher = Batcher(run, max_size=3, concurrency=2)
    calls = [asyncio.ensure_future(batcher.submit(x)) for x in "abcdefgh"]
    await started(run, 2)
    assert run.batches == [list("abc"), list("def")]  # two in flight, the rest waits
    run.gate.set()
    assert await asyncio.gather(*calls) == list("ABCDEFGH")
    assert run.batches == [list("abc"), list("def"), list("gh")]


async def test_a_hung_batch_does_not_hold_up_the_others():
    hung = asyncio.Event()

    async def run(items: list[str]) -> list[str]:
        if "slow" in items:
            await hung.wait()
        return items

    batcher = Batcher(run, max_size=10, concurrency=2)
    slow = asyncio.ensure_future(batcher.submit("slow"))
    await asyncio.sleep(0)  # one turn of the loop: the slow batch starts (no timing involved)
    assert await asyncio.wait_for(batcher.submit("quick"), 5) == "quick"
    assert not slow.done()
    hung.set()
    assert await slow == "slow"


@pytest.mark.parametrize("split", [True, False])
async def test_a_failed_batch_is_retried_item_by_item_only_when_split_says_so(split):
    run = Recorder(fail_on="bad")
    run.gate.clear()
    batcher = Batcher(run, max_size=10, concurrency=1, split=lambda exc: split)
    first = asyncio.ensure_future(batcher.submit("a"))
    await started(run, 1)
    calls = [asyncio.ensure_future(batcher.submit(x)) for x in ("b", "bad", "c")]
    run.gate.set()
    assert await first == "A"
    results = await asyncio.gather(*calls, return_exceptions=True)
    if split:
        assert results[0] == "B" and results[2] == "C"
        assert isinstance(results[1], ValueError)
        assert run.batches == [["a"], ["b", "bad", "c"], ["b"], ["bad"], ["c"]]
    else:
        assert all(isinstance(r, ValueError) for r in results)
        assert run.batches == [["a"], ["b", "bad", "c"]]


@pytest.mark.parametrize("keep", [True, False])
async def test_a_caller_that_leaves_is_dropped_unless_abandoned_items_are_kept(keep):
    run = Recorder()
    run.gate.clear()
    batcher = Batcher(run, max_size=10, concurrency=1, keep_abandoned=keep)
    first = asyncio.ensure_future(batcher.submit("a"))
    await started(run, 1)
    leaving = asyncio.ensure_future(batcher.submit("gone"))
    staying = asyncio.ensure_future(batcher.submit("b"))
    await asyncio.sleep(0)  # one turn of the loop: both calls are queued (no timing involved)
    leaving.cancel()
    run.gate.set()
    assert await first == "A" and await staying == "B"
    assert leaving.cancelled()
    assert run.batches[1] == (["gone", "b"] if keep else ["b"])


def test_each_event_loop_gets_its_own_queue():
    run = Recorder.__new__(Recorder)
    run.batches, run.fail_on = [], None

    async def once(item: str) -> str:
        run.gate = asyncio.Event()  # an Event belongs to the loop that waits on it
        run.gate.set()
        return await batcher.submit(item)

    batcher = Batcher(run, max_size=10)
    assert asyncio.run(once("x")) == "X"
    assert asyncio.run(once("y")) == "Y"
    assert run.batches == [["x"], ["y"]]


def test_sizes_below_one_are_refused():
    with pytest.raises(ValueError):
        Batcher(Recorder(), max_size=0)


async def test_a_batch_outlives_the_request_that_started_it():
    # A request's ThreadSensitiveContext ends with the request; a batch it started
    # serves other requests too, and must not die with it.
    release = asyncio.Event()

    async def run(items: list[str]) -> list[str]:
        await release.wait()
        return await sync_to_async(lambda: [item.upper() for item in items])()

    batcher = Batcher(run, max_size=10, concurrency=1)
    # The first request, in a context with a thread of its own, as ragsite.asgi gives each request.
    async with ThreadSensitiveContext(executor=ThreadPoolExecutor(1)):
        first = asyncio.ensure_future(batcher.submit("a"))
        await asyncio.sleep(0)  # one turn of the loop: its batch starts (no timing involved)
    second = asyncio.ensure_future(batcher.submit("b"))  # another request, after the first ended
    release.set()
    assert await first == "A" and await second == "B"
