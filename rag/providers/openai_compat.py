"""Chat and embeddings through the ``openai`` client: OpenAI or any compatible server
(vLLM, Ollama, llama.cpp's server, LM Studio)."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator

import httpx
import openai

from rag.providers.base import ChatChunk, ChatProvider, EmbeddingProvider, ProviderError

# One AsyncOpenAI (and so one connection pool) per event loop: httpx connections
# are bound to the loop that opened them, and manage.py commands and tests run
# several loops in one process.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, openai.AsyncOpenAI]] = (
    weakref.WeakKeyDictionary()
)


class OpenAIConfig:
    def __init__(self, *, api_key: str, base_url: str, timeout: float, max_retries: int) -> None:
        # Local OpenAI-compatible servers accept any key; the client insists on one.
        self.api_key = api_key or "not-needed"
        self.base_url = base_url or None
        self.timeout = timeout
        self.max_retries = max_retries

    @property
    def where(self) -> str:
        return self.base_url or "https://api.openai.com/v1"

    def client(self) -> openai.AsyncOpenAI:
        loop = asyncio.get_running_loop()
        per_loop = _clients.setdefault(loop, {})
        key = (self.api_key, self.base_url, self.timeout, self.max_retries)
        if key not in per_loop:
            per_loop[key] = openai.AsyncOpenAI(
                api_key=self.api_key,
                base_url=self.base_url,
                timeout=self.timeout,
                max_retries=self.max_retries,
            )
        return per_loop[key]

    def explain(self, exc: BaseException, what: str) -> ProviderError:
        """Turn a client exception into a message that says what to fix."""
        where = self.where
        if isinstance(exc, openai.APITimeoutError):
            return ProviderError(
                f"The {what} server at {where} did not answer within {self.timeout:g} s. "
                "Check that it is running and not overloaded, or raise RAG_LLM_TIMEOUT.",
                code="timeout",
            )
        if isinstance(exc, openai.APIConnectionError):
            return ProviderError(
                f"The {what} server is not reachable at {where}. Start it, or fix OPENAI_BASE_URL.",
                code="unreachable",
            )
        if isinstance(exc, openai.AuthenticationError):
            return ProviderError(
                f"The {what} server at {where} rejected the API key (401). Check OPENAI_API_KEY.", code="auth"
            )
        if isinstance(exc, openai.RateLimitError):
            return ProviderError(
                f"The {what} server at {where} is rate limiting requests (429). Wait a moment and ask again.",
                code="rate_limited",
            )
        if isinstance(exc, openai.NotFoundError):
            return ProviderError(
                f"The {what} server at {where} does not know the requested model (404): {_api_message(exc)} "
                "Check RAG_CHAT_MODEL / RAG_EMBEDDING_MODEL.",
                code="config",
            )
        if isinstance(exc, openai.APIStatusError):
            return ProviderError(
                f"The {what} server at {where} failed with HTTP {exc.status_code}: {_api_message(exc)}",
                code="upstream_error",
            )
        if isinstance(exc, (httpx.HTTPError, ValueError)):
            # Mid-stream: a dropped connection or a chunk that is not valid JSON.
            return ProviderError(
                f"The {what} server at {where} broke off or sent a malformed stream "
                f"({type(exc).__name__}). The partial answer was kept; ask again.",
                code="bad_stream",
            )
        return ProviderError(f"The {what} server at {where} failed: {exc}", code="upstream_error")


def _api_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(exc.message)


class OpenAIEmbeddings(EmbeddingProvider):
    def __init__(self, *, config: OpenAIConfig, model: str, dimensions: int = 0) -> None:
        self.config = config
        self.model = model if not dimensions else f"{model}@{dimensions}"
        self._api_model = model
        self._dimensions = dimensions
        self.description = f"OpenAI-compatible embeddings '{model}' at {config.where}"

    async def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        extra = {"dimensions": self._dimensions} if self._dimensions else {}
        try:
            response = await self.config.client().embeddings.create(
                model=self._api_model, input=texts, encoding_format="float", **extra
            )
        except (openai.OpenAIError, httpx.HTTPError, ValueError) as exc:
            raise self.config.explain(exc, "embedding") from exc
        ordered = sorted(response.data, key=lambda item: item.index)
        return [item.embedding for item in ordered]


class OpenAIChat(ChatProvider):
    def __init__(self, *, config: OpenAIConfig, model: str) -> None:
        self.config = config
        self.model = model
        self.description = f"OpenAI-compatible chat '{model}' at {config.where}"

    async def stream(
        self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float
    ) -> AsyncIterator[ChatChunk]:
        try:
            response = await self.config.client().chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=temperature,
                stream=True,
            )
        except (openai.OpenAIError, httpx.HTTPError) as exc:
            raise self.config.explain(exc, "LLM") from exc
        finished = False
        # ``async with`` closes the HTTP response when this generator is closed
        # early, which is what tells the server to stop generating.
        async with response:
            try:
                async for chunk in response:
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    text = choice.delta.content if choice.delta else None
                    if text or choice.finish_reason:
                        if choice.finish_reason:
                            finished = True
                        yield ChatChunk(text=text or "", finish_reason=choice.finish_reason)
            except (openai.OpenAIError, httpx.HTTPError, json.JSONDecodeError) as exc:
                raise self.config.explain(exc, "LLM") from exc
        if not finished:
            raise ProviderError(
                f"The LLM server at {self.config.where} ended the stream without finishing the answer. "
                "The partial answer was kept; ask again.",
                code="bad_stream",
            )
