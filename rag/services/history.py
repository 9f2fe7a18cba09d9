"""What a follow-up question carries of its conversation: the earlier turns put into the
prompt, and the question condensed with them into a standalone search query."""

from __future__ import annotations

import logging
import uuid

from django.conf import settings

from rag.models import Message, Reader
from rag.providers import ChatProvider, ProviderError
from rag.providers.base import estimate_tokens

logger = logging.getLogger(__name__)

CONDENSE_PROMPT = (
    "Rewrite the user's last question as one standalone search query that can be understood "
    "without the conversation. Reply with the query only, no explanation."
)
CONDENSE_MAX_TOKENS = 64


def turns_before(
    conversation_id: uuid.UUID, before: int | None, budget_tokens: int, reader: Reader | None = None
) -> list[dict[str, str]]:
    """The complete turns of a conversation before the message ``before`` (None: all of them),
    as chat messages, newest kept first within ``budget_tokens``, returned oldest first.
    A turn whose answer quotes a collection ``reader`` may no longer read is left out: it
    would feed the model what the asker may not see any more."""
    earlier = Message.objects.filter(conversation_id=conversation_id).order_by("-id")
    if before is not None:
        earlier = earlier.filter(pk__lt=before)
    if reader is not None:
        earlier = earlier.exclude(pk__in=Message.objects.citing_unreadable(reader).values("pk"))
    history: list[dict[str, str]] = []
    used = 0
    pending_answer: Message | None = None
    for message in earlier:  # newest first
        if message.role == Message.Role.ASSISTANT:
            pending_answer = message
            continue
        reply, pending_answer = pending_answer, None
        if reply is None or reply.status != Message.Status.COMPLETE or not reply.text:
            continue  # a question without a usable answer teaches the model nothing
        cost = estimate_tokens(message.text) + estimate_tokens(reply.text)
        if used + cost > budget_tokens:
            break
        used += cost
        history[:0] = [{"role": "user", "content": message.text}, {"role": "assistant", "content": reply.text}]
    return history


async def condense(*, question: str, history: list[dict[str, str]], chat: ChatProvider) -> str:
    """A standalone search query for a follow-up question; the question itself on failure."""
    if not history:
        return question
    transcript = "\n".join(f"{m['role']}: {m['content']}" for m in history)
    messages = [
        {"role": "system", "content": CONDENSE_PROMPT},
        {"role": "user", "content": f"Conversation:\n{transcript}\n\nLast question: {question}"},
    ]
    try:
        query = await chat.complete(messages, max_tokens=CONDENSE_MAX_TOKENS, temperature=0.0)
    except ProviderError as exc:
        # Retrieval on the raw question is worse but still useful; the answer
        # itself will report the provider failure if it persists.
        logger.warning("Condensing a follow-up failed (%s); searching with the question as asked", exc.code)
        return question
    query = " ".join(query.split())
    return query[: settings.RAG_MAX_QUESTION_CHARS] or question
