"""The WebSocket transport: the chat service's events as JSON messages.

Client → server::

    {"type": "ask", "question": "...", "k": 4, "conversation_id": "<uuid>"}   # k, conversation_id optional
    {"type": "stop"}

Server → client, per answer::

    {"type": "started", "answer_id": 41, "conversation_id": "<uuid>"}
    {"type": "sources", "sources": [...]}
    {"type": "token", "text": "..."}            # many
    {"type": "metrics", ...} | {"type": "error", "message": "...", "code": "..."}
    {"type": "done", "answer_id": 41, "status": "complete"}

One answer at a time per socket. Closing the socket stops the answer, as
closing an SSE stream does. Input a client must fix gets
``{"type": "error", "code": "bad_request", "message": ...}`` and the socket
stays open.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from contextlib import aclosing, suppress

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from rag.forms import BadQuestion, parse_question
from rag.models import Message, Reader
from rag.services import answering, chat
from rag.sessions import anonymous_owner


class RagConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        self.task: asyncio.Task | None = None
        self.answer_id: int | None = None
        self.stopping = False
        self.owner: chat.Owner | None = None
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.task is not None and not self.task.done():
            # Like a client leaving an SSE stream: the answer is saved as stopped.
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
        if kind == "ask":
            await self.ask(content)
        elif kind == "stop":
            await self.stop()
        else:
            await self.bad_request(f"Unknown message type {str(kind)[:40]!r}: use 'ask' or 'stop'.")

    async def ask(self, content: dict) -> None:
        if self.task is not None and not self.task.done():
            await self.bad_request('One question at a time: wait for "done", or send {"type": "stop"} first.')
            return
        try:
            q = parse_question(question=content.get("question"), k=content.get("k"))
            conversation_id = _uuid(content.get("conversation_id"))
        except BadQuestion as exc:
            await self.bad_request(str(exc))
            return
        owner = await self.get_owner()
        try:
            answer = await chat.ask(owner=owner, question=q.question, k=q.k, conversation_id=conversation_id)
            reader = Reader.of(self.scope.get("user"))
            events = await chat.stream_turn(owner=owner, answer_id=answer.pk, collections=reader)
        except chat.NotFound:
            await self.bad_request("No such conversation: leave out conversation_id to start a new one.")
            return
        self.answer_id, self.stopping = answer.pk, False
        self.task = asyncio.create_task(self.relay(events))

    async def stop(self) -> None:
        if self.task is None or self.task.done() or self.answer_id is None:
            await self.bad_request("Nothing to stop: no answer is being written.")
            return
        self.stopping = True
        await chat.stop(owner=await self.get_owner(), answer_id=self.answer_id)

    async def relay(self, events) -> None:
        # This task iterates the generation, so it is the one chat.stop cancels.
        try:
            async with aclosing(events):
                async for event in events:
                    await self.send_json(_as_json(event))
        except asyncio.CancelledError:
            if not self.stopping:
                raise  # the socket closed
            # The stop landed while a message was being sent rather than inside the
            # generation; closing it above saved the answer: report how it ended.
            asyncio.current_task().uncancel()
            answer = await Message.objects.aget(pk=self.answer_id)
            await self.send_json(_as_json(chat.metrics_of(answer)))
            await self.send_json(_as_json(chat.Done(answer=answer)))

    async def bad_request(self, message: str) -> None:
        await self.send_json({"type": "error", "code": "bad_request", "message": message})

    async def get_owner(self) -> chat.Owner:
        if self.owner is None:
            user = self.scope.get("user")
            if user is not None and user.is_authenticated:
                self.owner = chat.Owner(user_id=user.pk)
            else:
                self.owner = chat.Owner(user_id=None, session_key=await self._session_key())
        return self.owner

    async def _session_key(self) -> str:
        session = self.scope.get("session")
        if session is None:
            from django.contrib.sessions.backends.db import SessionStore

            session = SessionStore()
        # A socket without a session still owns what it asks, through a session
        # made for it (its conversations are not listed on a page).
        return await anonymous_owner(session, create=True)


def _uuid(value: object) -> uuid.UUID | None:
    if value in (None, ""):
        return None
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise BadQuestion("'conversation_id' must be the id of one of your conversations (a UUID).") from None


def _as_json(event: chat.ChatEvent) -> dict:
    match event:
        case answering.Token(text=text):
            return {"type": "token", "text": text}
        case answering.Sources(sources=sources):
            return {"type": "sources", "sources": [s.public() for s in sources]}
        case answering.Metrics():
            return {"type": "metrics", **event.as_dict()}
        case answering.Error(message=message, code=code, message_id=message_id):
            return {"type": "error", "message": message, "code": code, "message_id": message_id}
        case chat.Started(answer_id=answer_id, conversation_id=conversation_id):
            return {"type": "started", "answer_id": answer_id, "conversation_id": conversation_id}
        case chat.Done(answer=answer):
            return {"type": "done", "answer_id": answer.pk, "status": answer.status}
    raise TypeError(f"not a chat event: {event!r}")
