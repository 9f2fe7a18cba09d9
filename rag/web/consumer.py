"""The WebSocket transport: the chat service's events as JSON messages.

Client → server::

    {"type": "ask", "question": "...", "k": 4, "conversation_id": "<uuid>", "collection": "<name>"}
                                            # k, conversation_id and collection optional
    {"type": "stop"}
    {"type": "resume", "last_event_id": "<id>"}   # after a reconnect: the events after that one

Server → client, per answer::

    {"type": "started", "answer_id": 41, "conversation_id": "<uuid>"}
    {"type": "sources", "sources": [...], "id": "<answer's public id>.1"}
    {"type": "token", "text": "...", "id": "….2"}            # many
    {"type": "metrics", ..., "id": "….9"} | {"type": "error", "message": "...", "code": "...", "id": "….9"}
    {"type": "done", "answer_id": 41, "status": "complete", "id": "….10"}

One answer at a time per socket. Closing the socket does not stop the answer: it is
finished and saved, and a new socket can resume it with the last ``id`` it saw. Stop
stops it. Input a client must fix (a misspelt key included) gets ``{"type": "error", "code": "bad_request",
"message": ...}`` and the socket stays open; so does a message the database could not be reached for
(``"code": "unavailable"``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from contextlib import aclosing, suppress

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.contrib.auth import get_user_model

from rag.answers import events
from rag.answers.access import Owner, scope_owner
from rag.answers.events import LogEvent, parse_id
from rag.forms import BadQuestion, parse_collection_name, parse_question
from rag.models import Reader
from rag.services import chat
from rag.services.connections import UNREACHABLE, UNREACHABLE_ERRORS, arelease_connection

logger = logging.getLogger(__name__)


class RagConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        self.task: asyncio.Task | None = None
        self.answer_id: int | None = None
        self.owner: Owner | None = None
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.task is not None and not self.task.done():
            # Only the relay ends: the answer goes on, is saved, and can be resumed.
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            content = json.loads(text_data if text_data is not None else (bytes_data or b""))
        except (ValueError, UnicodeDecodeError):
            await self.bad_request('Send JSON text, e.g. {"type": "ask", "question": "..."}.')
            return
        if not isinstance(content, dict):
            await self.bad_request('Send a JSON object, e.g. {"type": "ask", "question": "..."}.')
            return
        await self.receive_json(content)

    async def receive_json(self, content: dict, **kwargs) -> None:
        kind = content.get("type")
        if kind in _KEYS and (unknown := sorted(map(str, content.keys() - _KEYS[kind]))):
            # A misspelt key ("conversationId") would otherwise start a new conversation, silently.
            await self.bad_request(
                f"Unknown key {unknown[0][:40]!r} in {kind!r}: it takes {', '.join(sorted(_KEYS[kind]))}."
            )
            return
        try:
            if kind == "ask":
                await self.ask(content)
            elif kind == "stop":
                await self.stop()
            elif kind == "resume":
                await self.resume(content)
            else:
                await self.bad_request(f"Unknown message type {str(kind)[:40]!r}: use 'ask', 'stop' or 'resume'.")
        except UNREACHABLE_ERRORS as exc:
            # As the HTTP views' 503 (ragsite.middleware): say so, and keep the socket open.
            logger.error("WebSocket %r: the database cannot be reached: %s", kind, exc)
            await self.send_json({"type": "error", "code": "unavailable", "message": UNREACHABLE})

    async def ask(self, content: dict) -> None:
        if self.task is not None and not self.task.done():
            await self.bad_request('One question at a time: wait for "done", or send {"type": "stop"} first.')
            return
        try:
            q = parse_question(question=content.get("question"), k=content.get("k"))
            conversation_id = _uuid(content.get("conversation_id"))
            collection = parse_collection_name(content.get("collection"))
        except BadQuestion as exc:
            await self.bad_request(str(exc))
            return
        owner = await self.get_owner()
        reader = await self.reader()
        collection_id = None
        if collection is not None:
            collection_id = await reader.acollection_named(collection)
            if collection_id is None:
                await self.bad_request(
                    f"There is no collection named {collection!r} that you may read. "
                    "Leave out 'collection' to search every collection you may read."
                )
                return
        try:
            answer = await chat.ask(
                owner=owner,
                question=q.question,
                k=q.k,
                conversation_id=conversation_id,
                collection_id=collection_id,
                collections=reader,
            )
            events = await chat.stream_turn(owner=owner, answer_id=answer.pk)
        except chat.NotFound:
            await self.bad_request("No such conversation: leave out conversation_id to start a new one.")
            return
        await self.send_json(
            {"type": "started", "answer_id": answer.pk, "conversation_id": str(answer.conversation_id)}
        )
        self.answer_id = answer.pk
        await arelease_connection()  # the lookups' connection: the answer may take a while
        self.task = asyncio.create_task(self.relay(events))

    async def resume(self, content: dict) -> None:
        if self.task is not None and not self.task.done():
            await self.bad_request("An answer is already being sent on this socket.")
            return
        last = content.get("last_event_id")
        parsed = parse_id(last if isinstance(last, str) else None)
        if parsed is None:
            await self.bad_request("'last_event_id' must be the id of the last event you received.")
            return
        owner = await self.get_owner()
        try:
            answer = await chat.find_answer(owner=owner, key=parsed[0])
            events = await chat.stream_turn(
                owner=owner, answer_id=answer.pk, after=parsed[1], collections=await self.reader()
            )
        except chat.NotFound:
            await self.bad_request("No such answer of yours to resume.")
            return
        self.answer_id = answer.pk
        await arelease_connection()
        self.task = asyncio.create_task(self.relay(events))

    async def stop(self) -> None:
        if self.task is None or self.task.done() or self.answer_id is None:
            await self.bad_request("Nothing to stop: no answer is being written.")
            return
        await chat.stop(owner=await self.get_owner(), answer_id=self.answer_id)

    async def relay(self, events) -> None:
        async with aclosing(events):
            async for event in events:
                await self.send_json(_as_json(event))

    async def bad_request(self, message: str) -> None:
        await self.send_json({"type": "error", "code": "bad_request", "message": message})

    async def reader(self) -> Reader:
        """What the user may read now: the staff, superuser and active flags as they are, not as
        they were when the socket connected (a user made inactive reads as anonymous)."""
        user = self.scope.get("user")
        if user is not None and user.is_authenticated:
            user = await get_user_model().objects.filter(pk=user.pk).afirst()
        return Reader.of(user)

    async def get_owner(self) -> Owner:
        if self.owner is None:
            self.owner = await scope_owner(self.scope)
        return self.owner


#: What each message may hold.
_KEYS = {
    "ask": {"type", "question", "k", "conversation_id", "collection"},
    "stop": {"type"},
    "resume": {"type", "last_event_id"},
}


def _uuid(value: object) -> uuid.UUID | None:
    if value in (None, ""):
        return None
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise BadQuestion("'conversation_id' must be the id of one of your conversations (a UUID).") from None


def _as_json(event: LogEvent) -> dict:
    match event.kind:
        case events.TOKEN:
            body = {"text": event.data}
        case events.SOURCES:
            body = {"sources": event.data}
        case events.METRICS | events.ERROR:
            body = dict(event.data)
        case events.DONE:
            body = {"answer_id": event.answer_id, **event.data}
        case _:
            raise TypeError(f"not an answer event: {event!r}")
    return {"type": event.kind, **body, "id": event.id}
