"""Provider selection from settings.

``chat_provider()``, ``embedding_provider()`` and ``reranker()`` build the provider the
settings name, once per distinct configuration, so a settings override in a
test picks a new one while a running server reuses the loaded models.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from functools import cache
from typing import Any, TypeVar

from django.conf import settings

from rag.providers.base import ChatChunk, ChatProvider, EmbeddingProvider, ProviderError, QueryVector
from rag.providers.rerank import CrossEncoderReranker, Reranker

__all__ = [
    "ChatChunk",
    "ChatProvider",
    "EmbeddingProvider",
    "ProviderError",
    "QueryVector",
    "Reranker",
    "aclose",
    "chat_provider",
    "closing",
    "embedding_provider",
    "reranker",
    "run",
]

T = TypeVar("T")


async def aclose() -> None:
    """Close the HTTP clients the providers opened on the running event loop.

    A server's loop keeps them for its lifetime. A short-lived loop (a command's
    ``asyncio.run``, ``async_to_sync`` in a sync view) closes them before it ends:
    otherwise the connections leak and aiohttp complains at exit.
    """
    from rag.providers.openai_compat import aclose_clients

    await aclose_clients()


async def closing(awaitable: Awaitable[T]) -> T:
    """``await awaitable``, then close the providers' clients of this loop (see ``aclose``)."""
    try:
        return await awaitable
    finally:
        await aclose()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` for management commands: the providers' clients close with the loop."""
    return asyncio.run(closing(main))


def _openai_config():
    from rag.providers.openai_compat import OpenAIConfig

    return OpenAIConfig(
        api_key=settings.OPENAI_API_KEY,
        base_url=settings.OPENAI_BASE_URL,
        timeout=settings.RAG_LLM_TIMEOUT,
        max_retries=settings.RAG_LLM_MAX_RETRIES,
    )


def chat_provider() -> ChatProvider:
    return _chat(
        settings.RAG_CHAT_PROVIDER,
        settings.RAG_CHAT_MODEL,
        settings.OPENAI_API_KEY,
        settings.OPENAI_BASE_URL,
        settings.RAG_LLM_TIMEOUT,
        settings.RAG_LLM_MAX_RETRIES,
        settings.RAG_LLM_GGUF,
        settings.RAG_LOCAL_LLM_URL,
        settings.RAG_LOCAL_CONTEXT,
        settings.RAG_LLM_CONTEXT,
    )


def embedding_provider() -> EmbeddingProvider:
    return _embeddings(
        settings.RAG_EMBEDDING_PROVIDER,
        settings.RAG_EMBEDDING_MODEL,
        settings.RAG_EMBEDDING_DIMENSIONS,
        settings.OPENAI_API_KEY,
        settings.OPENAI_BASE_URL,
        settings.RAG_LLM_TIMEOUT,
        settings.RAG_LLM_MAX_RETRIES,
    )


def reranker() -> Reranker | None:
    """The cross-encoder RAG_RERANKER_MODEL names, or None when it is empty: no reranking."""
    if not settings.RAG_RERANKER_MODEL:
        return None
    return _reranker(settings.RAG_RERANKER_MODEL)


@cache
def _chat(kind: str, model: str, *_config: object) -> ChatProvider:
    if kind == "openai":
        from rag.providers.openai_compat import OpenAIChat

        return OpenAIChat(config=_openai_config(), model=model, context_tokens=settings.RAG_LLM_CONTEXT or None)
    if kind == "local":
        from rag.providers.local import LocalChat

        return LocalChat(
            url=settings.RAG_LOCAL_LLM_URL,
            model_path=settings.RAG_LLM_GGUF,
            timeout=settings.RAG_LLM_TIMEOUT,
            max_retries=settings.RAG_LLM_MAX_RETRIES,
            context_tokens=settings.RAG_LOCAL_CONTEXT,
        )
    if kind == "fake":
        from rag.providers.fake import FakeChat

        return FakeChat()
    raise ProviderError(f"Unknown RAG_CHAT_PROVIDER {kind!r}: use openai, local or fake.", code="config")


@cache
def _embeddings(kind: str, model: str, dimensions: int, *_config: object) -> EmbeddingProvider:
    if kind == "openai":
        from rag.providers.openai_compat import OpenAIEmbeddings

        return OpenAIEmbeddings(config=_openai_config(), model=model, dimensions=dimensions)
    if kind == "local":
        from rag.providers.local import LocalEmbeddings

        return LocalEmbeddings(model=model)
    if kind == "fake":
        from rag.providers.fake import FakeEmbeddings

        return FakeEmbeddings(dimensions=dimensions or 64)
    raise ProviderError(f"Unknown RAG_EMBEDDING_PROVIDER {kind!r}: use openai, local or fake.", code="config")


@cache
def _reranker(path: str) -> Reranker:
    return CrossEncoderReranker(path)
