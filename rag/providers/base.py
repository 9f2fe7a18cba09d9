"""The provider interface: one for embeddings, one for chat, chosen by settings."""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from rag.batching import Batcher

#: The most search queries embedded in one request.
QUERY_BATCH = 32


class ProviderError(Exception):
    """A failure a person can act on: the message says what went wrong and what to do.

    ``code`` is a short machine-readable kind (``unreachable``, ``timeout``,
    ``rate_limited``, ``auth``, ``upstream_error``, ``bad_stream``, ``model_stopped``,
    ``config``).
    """

    def __init__(self, message: str, *, code: str = "upstream_error") -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def public(self) -> ProviderError:
        """The same error for whoever asked, who may be anyone: the message without the
        server's addresses and file paths (the log keeps the whole of it)."""
        message = _URL.sub("the configured server", self.message)
        return ProviderError(_PATH.sub("a file on the server", message), code=self.code)


_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>()]*[^\s'\"<>().,;:!?]", re.IGNORECASE)
#: An absolute path of at least two parts (``/opt/models/x.gguf``), not a fraction or a URL's.
_PATH = re.compile(r"(?<![\w:/.])/(?:[\w.-]+/)+[\w.-]+")


@dataclass(frozen=True, slots=True)
class QueryVector:
    """A query embedding as pgvector's text literal (``[0.1,0.2,...]``).

    Search only ever sends the query vector to Postgres as text, so a provider
    that received it as text keeps it that way: formatting 1,536 floats back
    into text cost more CPU than the rest of the search.
    """

    literal: str
    dimensions: int

    @classmethod
    def from_floats(cls, vector: list[float]) -> QueryVector:
        return cls(literal="[" + ",".join(map(str, vector)) + "]", dimensions=len(vector))


@dataclass(frozen=True, slots=True)
class ChatChunk:
    """One piece of a streamed reply: text, and on the last piece the finish reason."""

    text: str = ""
    finish_reason: str | None = None


class EmbeddingProvider(ABC):
    #: The model id recorded on every chunk it embeds; search only compares
    #: vectors made by the same model.
    model: str
    description: str

    @abstractmethod
    async def embed(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, in order."""

    def warm(self) -> bool:
        """Load the model now rather than on the first question (blocking: call it from a
        thread). False if it could not; the first question then says why."""
        return True

    async def embed_query(self, text: str) -> QueryVector:
        """The vector of one search query.

        Queries asked at the same time are embedded together: one request (or
        one forward pass) for all that arrived while earlier ones were in flight,
        instead of one each. A lone query is sent at once.
        """
        return await self._queries.submit(text)

    async def embed_queries(self, texts: list[str]) -> list[QueryVector]:
        """The vectors of several search queries, in order."""
        return [QueryVector.from_floats(vector) for vector in await self.embed(texts)]

    @functools.cached_property
    def _queries(self) -> Batcher[str, QueryVector]:
        return Batcher(
            self.embed_queries,
            max_size=QUERY_BATCH,
            # A server error may be about one query of the batch: the others are
            # retried alone. Unreachable, timed out or rate limited: all fail.
            split=lambda exc: isinstance(exc, ProviderError) and exc.code in ("upstream_error", "bad_stream"),
        )

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` as this model counts them (an estimate by default)."""
        return estimate_tokens(text)


class ChatProvider(ABC):
    model: str
    description: str
    #: True for the small bundled model, so the UI can suggest a stronger one.
    is_bundled: bool = False
    #: The model's context window in tokens, prompt and reply together; None when it is
    #: large or unknown: the prompt is then bounded by RAG_CONTEXT_CHARS and
    #: RAG_HISTORY_TOKENS only (rag.services.prompting).
    context_tokens: int | None = None

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """The tokens of each text as this model counts them (an estimate by default)."""
        return [estimate_tokens(text) for text in texts]

    def warm(self) -> bool:
        """Load or reach the model now rather than on the first question (blocking: call it
        from a thread). False if it could not; the first question then says why."""
        return True

    @abstractmethod
    def stream(
        self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float
    ) -> AsyncIterator[ChatChunk]:
        """Stream the reply. Closing the iterator (``aclose()``, cancellation)
        must stop generation upstream at once."""

    async def complete(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float) -> str:
        """The whole reply as one string (for short internal calls such as condensing
        a follow-up question). Collects ``stream`` so every provider gets it for free."""
        stream = self.stream(messages, max_tokens=max_tokens, temperature=temperature)
        async with aclosing(stream):
            return "".join([chunk.text async for chunk in stream])


_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def estimate_tokens(text: str) -> int:
    """Word-piece estimate (~1.3 tokens per word for English BPE vocabularies)."""
    words = _TOKEN_RE.findall(text)
    return max(1, round(len(words) * 1.3)) if words else 0
