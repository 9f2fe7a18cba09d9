"""Where an answer is generated: once, in a task of this process, into its event log.

``start`` runs the generation of a claimed answer (the chat service claims its answers;
the API creates them claimed); ``stop`` stops one wherever it runs. However a generation
ends (complete, an LLM failure, Stop, the process shutting down), the answer is saved
with its text, and its log ends with ``done``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from contextlib import aclosing
from dataclasses import dataclass

from django.conf import settings

from rag.answers import follow, live, notify, store
from rag.answers.events import DONE, ERROR, METRICS, SOURCES, TOKEN
from rag.models import Message
from rag.providers import ChatProvider, EmbeddingProvider, ProviderError, chat_provider
from rag.services import answer_rows, answering
from rag.services.connections import UNREACHABLE_ERRORS
from rag.services.metadata_filter import MetadataFilter
from rag.services.retrieval import CollectionScope, Source

logger = logging.getLogger(__name__)

#: How often the final save of an answer is tried again while the database cannot be reached.
SAVE_RETRY_S = 1.0
SAVE_FAILED = "The answer could not be saved as it ended; the text it had so far was kept. Ask again."


@dataclass(frozen=True, slots=True)
class Prompt:
    """What an answer is generated from: the question, what the search embeds when it
    differs (a follow-up condensed with its conversation), and the conversation so far."""

    question: str
    search_query: str | None = None
    history: list[dict[str, str]] | None = None


async def start(
    answer: Message,
    *,
    prepare: Callable[[], Awaitable[Prompt]],
    chat: ChatProvider | None = None,
    embedder: EmbeddingProvider | None = None,
    collections: CollectionScope = None,
    metadata: MetadataFilter | None = None,
    asker: Hashable | None = None,
) -> live.Live:
    """Generate the claimed ``answer`` in a task of this process; ``prepare`` runs first,
    inside that task (it may ask the LLM to condense a follow-up). ``asker``: see live.Live."""
    await notify.listener()  # listening, so that Stop pressed in another process reaches it
    return live.start(
        answer.pk,
        str(answer.public_id),
        lambda run: _run(
            run, answer, prepare=prepare, chat=chat, embedder=embedder, collections=collections, metadata=metadata
        ),
        asker=asker,
    )


async def stop(answer: Message) -> bool:
    """Stop ``answer`` wherever it is generated: its upstream LLM request closes and the
    partial text is kept as ``stopped``. False when it had already ended."""
    if live.stop(answer.pk):
        return True
    if await store.stop_unclaimed(answer.pk):
        return True  # nobody had begun it: it never will
    if answer.status != Message.Status.STREAMING:
        return False
    await notify.publish_stop(answer.pk)  # the process generating it cancels it
    return True


async def _run(
    run: live.Live,
    answer: Message,
    *,
    prepare: Callable[[], Awaitable[Prompt]],
    chat: ChatProvider | None,
    embedder: EmbeddingProvider | None,
    collections: CollectionScope,
    metadata: MetadataFilter | None,
) -> None:
    save = answer_rows.saver_for(answer)
    saved = False

    async def save_once(outcome: answering.Outcome) -> Message:
        nonlocal saved
        message = await _save_when_reachable(save, outcome, answer_id=answer.pk)
        saved = True
        return message

    started = time.perf_counter()
    chat = chat or chat_provider()
    failed = False
    renewing = asyncio.create_task(_renew_claim_while(run, answer))
    try:
        prompt = await prepare()
        events = answering.generate(
            question=prompt.question,
            k=answer.k or settings.RAG_DEFAULT_K,
            save=save_once,
            chat=chat,
            embedder=embedder,
            search_query=prompt.search_query,
            history=prompt.history,
            collections=collections,
            metadata=metadata,
        )
        async with aclosing(events):
            async for event in events:
                run.append(*as_log(event))
    except asyncio.CancelledError:
        if not run.stopping:
            raise  # the process is shutting down: saved below as stopped
        # Stopped on request: generate saved the partial answer; say how it ended.
        asyncio.current_task().uncancel()
        if saved:
            run.append(METRICS, follow.metrics_of(answer))
    except Exception:
        # Saving the answer failed (the database went away, say): saved below as an error.
        logger.exception("Generating answer %d failed", answer.pk)
        failed = True
    finally:
        renewing.cancel()
        if not saved:
            # Cancelled, failed before generate took over, or its save failed: never leave
            # the answer claimed but streaming forever, and keep what it had so far.
            kept = _kept(run, chat=chat, started=started, failed=failed)
            try:
                await save_once(kept)  # fills ``answer`` in memory before it writes
            except Exception:
                logger.exception("Saving what answer %d had failed too; its event log keeps the text", answer.pk)
            run.append(ERROR if failed else METRICS, _failure(answer) if failed else follow.metrics_of(answer))
        run.append(DONE, {"status": answer.status})


async def _save_when_reachable(save: answering.SaveAnswer, outcome: answering.Outcome, *, answer_id: int) -> Message:
    """``save(outcome)``, tried again every SAVE_RETRY_S while the database cannot be reached
    (restarting, failing over), as the event writer does with the answer's events: given up,
    the answer's row would stay ``streaming`` for good, its log ending in an error that no
    reader turns into an end of the row. Shutting the process down cancels the wait."""
    failed_at = None
    while True:
        try:
            message = await save(outcome)
        except UNREACHABLE_ERRORS as exc:
            if failed_at is None:  # once, not every second of an outage
                failed_at = time.monotonic()
                logger.warning("Saving answer %d: the database cannot be reached (%s); trying again", answer_id, exc)
            await asyncio.sleep(SAVE_RETRY_S)
            continue
        if failed_at is not None:
            logger.info(
                "Saved answer %d, %.0f s after the database could not be reached",
                answer_id,
                time.monotonic() - failed_at,
            )
        return message


def as_log(event: answering.AnswerEvent) -> tuple[str, object]:
    """An event of ``answering.generate`` as the log keeps it."""
    match event:
        case answering.Token(text=text):
            return TOKEN, text  # exactly, NUL included: the log is text, not jsonb
        case answering.Sources(sources=sources):
            return SOURCES, [s.public() for s in sources]
        case answering.Metrics():
            return METRICS, event.as_dict()
        case answering.Error(message=message, code=code, message_id=message_id):
            return ERROR, {"message": message, "code": code, "message_id": message_id}
    raise TypeError(f"not an answer event: {event!r}")


def _kept(run: live.Live, *, chat: ChatProvider, started: float, failed: bool) -> answering.Outcome:
    """The answer as far as it got, for a generation that ended before generate saved it."""
    sources = next((e.data for e in run.events if e.kind == SOURCES), [])
    return answering.Outcome(
        status=Message.Status.ERROR if failed else Message.Status.STOPPED,
        text=run.text(),
        tokens=sum(e.kind == TOKEN for e in run.events),
        error=ProviderError(SAVE_FAILED, code="internal") if failed else None,
        model=chat.model,
        total_ms=(time.perf_counter() - started) * 1000,
        finish_reason="error" if failed else "stopped",
        sources=[Source.from_public(s, n) for n, s in enumerate(sources, start=1)],
    )


def _failure(answer: Message) -> dict:
    return {"message": SAVE_FAILED, "code": "internal", "message_id": answer.pk}


async def _renew_claim_while(run: live.Live, answer: Message) -> None:
    """While the generation runs, tokens or not (a slow prefill, a queue at the model):
    a fresh claim every RAG_CLAIM_RENEW_S, with the text so far in case this process dies."""
    while True:
        await asyncio.sleep(settings.RAG_CLAIM_RENEW_S)
        try:
            await store.renew_claim(answer.pk, text=run.text())
        except UNREACHABLE_ERRORS as exc:  # the next one may reach it: Postgres restarts
            logger.warning("Renewing the claim of answer %d failed (%s)", answer.pk, exc)
