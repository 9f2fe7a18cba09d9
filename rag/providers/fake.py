"""In-process providers with no model and no network: for tests and the
database-bound ingestion benchmark."""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import AsyncIterator

from rag.providers.base import ChatChunk, ChatProvider, EmbeddingProvider

_WORD = re.compile(r"\w+", re.UNICODE)


def bag_of_words(text: str, dimensions: int) -> list[float]:
    """A deterministic, normalized bag-of-words vector: texts sharing words are close."""
    vector = [0.0] * dimensions
    for word in _WORD.findall(text.lower()):
        bucket = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big") % dimensions
        vector[bucket] += 1.0
    norm = math.sqrt(sum(v * v for v in vector))
    if not norm:
        vector[0] = 1.0
        return vector
    return [v / norm for v in vector]


class FakeEmbeddings(EmbeddingProvider):
    def __init__(self, *, dimensions: int = 64, model: str = "fake-bow") -> None:
        self.dimensions = dimensions
        self.model = f"{model}-{dimensions}"
        self.description = f"fake bag-of-words embeddings ({dimensions}-d, in process)"

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return [bag_of_words(text, self.dimensions) for text in texts]


class FakeChat(ChatProvider):
    """Replies with the configured tokens, one per event-loop turn."""

    def __init__(self, *, tokens: list[str] | None = None, model: str = "fake-chat") -> None:
        self.tokens = tokens if tokens is not None else ["This", " is", " a", " fake", " answer", " [1]", "."]
        self.model = model
        self.description = "fake chat (in process)"

    async def stream(
        self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float
    ) -> AsyncIterator[ChatChunk]:
        for token in self.tokens[:max_tokens]:
            await asyncio.sleep(0)
            yield ChatChunk(text=token)
        yield ChatChunk(finish_reason="stop" if len(self.tokens) <= max_tokens else "length")
