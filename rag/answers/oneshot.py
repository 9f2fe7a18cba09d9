"""Answers asked over the streaming API (``GET /rag/stream``): each one a turn of its own,
created claimed and generated at once, with the same event log as the chat's answers.

Who may read or stop one: the user who asked it; an answer asked anonymously has no
owner to check, so its public id, which cannot be guessed, is the capability.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError

from rag.answers import generate
from rag.models import Message
from rag.providers import ChatProvider, EmbeddingProvider, chat_provider
from rag.services import answer_rows
from rag.services.metadata_filter import MetadataFilter
from rag.services.retrieval import CollectionScope


class NotFound(LookupError):
    """No such answer for this asker (it may be someone else's)."""


async def start(
    *,
    question: str,
    k: int,
    user_id: int | None,
    collections: CollectionScope,
    metadata: MetadataFilter | None = None,
    chat: ChatProvider | None = None,
    embedder: EmbeddingProvider | None = None,
) -> Message:
    """Save the question and its answer, claimed, and start generating it in this process."""
    answer = await answer_rows.open_new_turn(
        question=question, user_id=user_id, model=(chat or chat_provider()).model, k=k
    )

    async def prompt() -> generate.Prompt:
        return generate.Prompt(question=question)

    await generate.start(
        answer, prepare=prompt, chat=chat, embedder=embedder, collections=collections, metadata=metadata
    )
    return answer


async def find(*, key: str, user_id: int | None) -> Message:
    """The answer whose public id is ``key``, if this asker may read it."""
    try:
        answer = await Message.objects.select_related("conversation").aget(public_id=key, role=Message.Role.ASSISTANT)
    except (Message.DoesNotExist, ValidationError):
        raise NotFound(key) from None
    owner = answer.conversation.user_id
    if owner is not None and owner != user_id:
        raise NotFound(key)
    return answer
