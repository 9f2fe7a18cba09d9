"""Chat and embeddings through the ``openai`` client: OpenAI or any compatible server
(vLLM, Ollama, llama.cpp's server, LM Studio)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai

try:  # openai >= 3 moved to the httpx2 fork; older releases use httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from rag.providers.base import ChatChunk, ChatProvider, EmbeddingProvider, ProviderError, QueryVector

# One AsyncOpenAI (and so one connection pool) per event loop: httpx connections
# are bound to the loop that opened them, and manage.py commands and tests run
# several loops in one process.
# Tells the client to return the response before reading its body.
_RAW_RESPONSE_HEADER = "X-Stainless-Raw-Response"

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, openai.AsyncOpenAI]] = (
    weakref.WeakKeyDictionary()
)


async def aclose_clients() -> None:
    """Close the clients made on the running loop (rag.providers.aclose)."""
    await _close_all(_clients.pop(asyncio.get_running_loop(), {}))


@atexit.register
def _close_left_clients() -> None:
    """A server's loop keeps its clients for its lifetime and stops without closing them
    (daphne has no shutdown hook): close them on that loop once it has stopped, or aiohttp
    prints "Unclosed client session" at every shutdown."""
    for loop in list(_clients):
        if not loop.is_running() and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.run_until_complete(_close_all(_clients.pop(loop, {})))


async def _close_all(clients: dict[tuple, openai.AsyncOpenAI]) -> None:
    for client in clients.values():
        await client.close()


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
                # The SDK's aiohttp transport: its C HTTP parser costs a
                # fraction of httpx's per streamed chunk.
                http_client=openai.DefaultAioHttpClient(),
            )
        return per_loop[key]

    async def post(self, path: str, body: dict[str, Any], *, stream: bool = False) -> httpx.Response:
        """POST a JSON body through the client; the response is raw (unread when ``stream``).

        The client still does what it is for: base URL, auth, retries before the
        first byte, and status errors as ``openai.APIStatusError``. What it skips is
        the typed path of ``client.chat.completions.create``: walking the messages
        against their TypedDicts and building a model object per chunk or float
        costs more CPU than everything else this app does per request.
        """
        headers = {"Content-Type": "application/json"}
        if stream:
            headers[_RAW_RESPONSE_HEADER] = "stream"  # what ``with_streaming_response`` sets
        return await self.client().post(
            path,
            content=json.dumps(body, ensure_ascii=False).encode(),
            cast_to=httpx.Response,
            options={"headers": headers},
        )

    def explain(self, exc: BaseException, what: str, *, mid_stream: bool = False) -> ProviderError:
        """Turn a client exception into a message that says what to fix."""
        where = self.where
        causes = _chain(exc)
        # The SDK's aiohttp transport reports a refused connection as a
        # ConnectTimeout; the aiohttp error underneath tells them apart.
        refused = any(isinstance(e, aiohttp.ClientConnectorError) for e in causes)
        timed_out = not refused and isinstance(exc, (openai.APITimeoutError, httpx.TimeoutException))
        if mid_stream and not timed_out:
            # The server answered, then broke off or sent something unparsable.
            return ProviderError(
                f"The {what} server at {where} broke off or sent a malformed stream "
                f"({type(exc).__name__}). The partial answer was kept; ask again.",
                code="bad_stream",
            )
        if timed_out:
            # Before the first byte the client retries a timeout too: the wait was that many times longer.
            attempts = "" if mid_stream or not self.max_retries else f", {self.max_retries + 1} times"
            return ProviderError(
                f"The {what} server at {where} did not answer within {self.timeout:g} s{attempts}. "
                "Check that it is running and not overloaded, or raise RAG_LLM_TIMEOUT.",
                code="timeout",
            )
        if refused or isinstance(exc, openai.APIConnectionError):
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
        return ProviderError(f"The {what} server at {where} failed: {exc}", code="upstream_error")

    def unfinished(self) -> ProviderError:
        """The stream ended cleanly but the answer had no finish reason."""
        return ProviderError(
            f"The LLM server at {self.where} ended the stream without finishing the answer. "
            "The partial answer was kept; ask again.",
            code="bad_stream",
        )


def _chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


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
        return await self._embed(texts, parse_float=float)

    async def embed_queries(self, texts: list[str]) -> list[QueryVector]:
        # The numbers stay the strings the server sent; pgvector parses them.
        vectors = await self._embed(texts, parse_float=str)
        return [QueryVector(literal="[" + ",".join(vector) + "]", dimensions=len(vector)) for vector in vectors]

    async def _embed(self, texts: list[str], *, parse_float: Callable[[str], object]) -> list[list[Any]]:
        body: dict[str, Any] = {"model": self._api_model, "input": texts, "encoding_format": "float"}
        if self._dimensions:
            body["dimensions"] = self._dimensions
        try:
            response = await self.config.post("/embeddings", body)
            data = json.loads(response.content, parse_float=parse_float)["data"]
            vectors = [item["embedding"] for item in sorted(data, key=lambda item: item["index"])]
        except (openai.OpenAIError, httpx.HTTPError) as exc:
            raise self.config.explain(exc, "embedding") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise ProviderError(
                f"The embedding server at {self.config.where} sent an unexpected response ({exc!r}).",
                code="bad_stream",
            ) from exc
        if len(vectors) != len(texts):
            raise ProviderError(
                f"The embedding server at {self.config.where} returned {len(vectors)} vectors for {len(texts)} texts.",
                code="bad_stream",
            )
        return vectors


class OpenAIChat(ChatProvider):
    #: Fields added to every chat request, beyond OpenAI's own.
    extra_body: dict[str, Any] = {}

    def __init__(self, *, config: OpenAIConfig, model: str, context_tokens: int | None = None) -> None:
        self.config = config
        self.model = model
        self.context_tokens = context_tokens
        self.description = f"OpenAI-compatible chat '{model}' at {config.where}"

    async def stream(
        self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float
    ) -> AsyncIterator[ChatChunk]:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
            **self.extra_body,
        }
        try:
            response = await self.config.post("/chat/completions", body, stream=True)
        except (openai.OpenAIError, httpx.HTTPError) as exc:
            raise self.config.explain(exc, "LLM") from exc
        finished = False
        try:
            async for data in sse_data(response):
                if data == b"[DONE]":
                    break
                chunk = _decode_chunk(data.decode())
                if "error" in chunk:
                    raise ProviderError(
                        f"The LLM server at {self.config.where} reported an error mid-answer: "
                        f"{_error_text(chunk['error'])}",
                        code="upstream_error",
                    )
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") or ""
                    reason = choice.get("finish_reason")
                    if reason:
                        finished = True
                    if text or reason:
                        yield ChatChunk(text=text, finish_reason=reason)
        except (openai.OpenAIError, httpx.HTTPError, ValueError, AttributeError, TypeError) as exc:
            raise self.config.explain(exc, "LLM", mid_stream=True) from exc
        finally:
            # Closing the response closes the connection: the server stops generating.
            await response.aclose()
        if not finished:
            raise self.config.unfinished()


async def sse_data(response: httpx.Response) -> AsyncIterator[bytes]:
    """The value of each ``data:`` line of an event stream, as bytes.

    Lines end at CR, LF or CRLF only, as the SSE spec says. ``aiter_lines()`` also splits
    text at U+2028, U+2029, NEL, VT, FF and FS/GS/RS, which servers send raw inside their
    JSON (llama.cpp's does), and so cut a token's chunk in two. ``bytes.splitlines`` knows
    only CR and LF. A CRLF split across two reads yields an extra empty line, which is
    ignored like every line that is not ``data:``.
    """
    pending = b""
    async for chunk in response.aiter_bytes():
        lines = (pending + chunk).splitlines(keepends=True)
        pending = lines.pop() if lines and not lines[-1].endswith((b"\n", b"\r")) else b""
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip(b" \r\n")
    if pending.startswith(b"data:"):
        yield pending[5:].strip(b" \r\n")


# strict=False: llama.cpp's server sends control characters raw inside strings. One decoder
# for every chunk: json.loads(data, strict=False) builds a decoder per call, 5.6 µs a chunk
# against 2.8 µs (50,000 chunks for 1,000 answers at once).
_decode_chunk = json.JSONDecoder(strict=False).decode


def _error_text(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)
