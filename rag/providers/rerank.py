"""Rerankers: a second look at what search found, scoring the question and each chunk together.

A cross-encoder reads the question and a chunk as one input, which judges relevance better
than comparing two vectors made apart, but costs a model pass per chunk: so it only reorders
the few chunks search already found (RAG_RERANK_CANDIDATES). Off unless RAG_RERANKER_MODEL
names a model folder.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from rag.providers.base import ProviderError

logger = logging.getLogger(__name__)


class Reranker(ABC):
    #: What scores the chunks (the model's folder), for logs and descriptions.
    model: str
    description: str

    @abstractmethod
    async def scores(self, question: str, texts: list[str]) -> list[float]:
        """One relevance score per text, in order; higher is more relevant. Only the order
        they make means anything: they are not on the scale of cosine similarity."""

    def warm(self) -> bool:
        """Load the model now rather than on the first question (blocking: call it from a
        thread). False if it could not; the first question then says why."""
        return True


class CrossEncoderReranker(Reranker):
    """A sentence-transformers CrossEncoder from a folder, on the CPU, loaded on first use."""

    def __init__(self, path: str) -> None:
        if not Path(path).is_dir():
            raise ProviderError(
                f"RAG_RERANKER_MODEL={path!r} is not a folder: point it at a folder holding a "
                "sentence-transformers CrossEncoder model, or leave it empty to rank by search alone.",
                code="config",
            )
        self.model = path
        self.description = f"local cross-encoder '{path}' (CPU)"
        self._encoder: Any = None
        self._lock = threading.Lock()
        # Hugging Face's fast tokenizer keeps its padding and truncation settings on itself,
        # so two predictions at once can break each other's batch (see LocalEmbeddings).
        self._predict_lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._encoder is None:
                logger.info("Loading reranker %s", self.model)
                from sentence_transformers import CrossEncoder

                try:
                    # local_files_only: a folder that lacks a file must fail here, not reach for a hub.
                    encoder = CrossEncoder(self.model, device="cpu", local_files_only=True)
                except Exception as exc:
                    raise ProviderError(
                        f"RAG_RERANKER_MODEL={self.model!r} could not be loaded as a CrossEncoder "
                        f"({type(exc).__name__}: {exc}): point it at a folder saved by sentence-transformers "
                        "(CrossEncoder.save_pretrained), or leave it empty to rank by search alone.",
                        code="config",
                    ) from exc
                if encoder.num_labels != 1:
                    # A classifier of several labels gives no single relevance score to sort by.
                    raise ProviderError(
                        f"RAG_RERANKER_MODEL={self.model!r} has {encoder.num_labels} output labels; a reranker "
                        "has one (a relevance score): point it at a reranking cross-encoder.",
                        code="config",
                    )
                self._encoder = encoder
            return self._encoder

    def warm(self) -> bool:
        self._load()
        return True

    async def scores(self, question: str, texts: list[str]) -> list[float]:
        if not texts:
            return []
        return await asyncio.to_thread(self.scores_sync, question, texts)

    def scores_sync(self, question: str, texts: list[str]) -> list[float]:
        encoder = self._load()
        with self._predict_lock:
            pairs = [(question, text) for text in texts]
            # No progress bar: sentence-transformers shows one whenever logging is at INFO.
            scores = encoder.predict(pairs, convert_to_numpy=True, show_progress_bar=False)
        return [float(score) for score in scores]
