"""Models loaded when a web process starts, not on its first question.

Loading MiniLM (torch included) took 5.7 s, paid by whoever asked first while /healthz
already said ok. ``start()`` (called by ragsite.asgi) loads the embedder (and the reranker,
if RAG_RERANKER_MODEL names one) and waits for the local chat model's process in a
background thread, so connections are accepted at once; ``/healthz`` answers 503
"starting" until it is done. A question that arrives meanwhile
waits for that load (the provider's lock) instead of starting a second one.
"""

from __future__ import annotations

import logging
import threading

from django.conf import settings

from rag.providers import ProviderError, chat_provider, embedding_provider, reranker

logger = logging.getLogger(__name__)

_done = threading.Event()
_state = {"embeddings": "loading", "chat": "waiting"}
_started = threading.Lock()


def start() -> None:
    """Warm up in the background, once per process."""
    if _started.acquire(blocking=False):
        if settings.RAG_RERANKER_MODEL:  # only listed when there is one to load
            _state["reranker"] = "loading"
        threading.Thread(target=_warm, name="warm-up", daemon=True).start()


def ready() -> bool:
    return _done.is_set()


def state() -> dict[str, str]:
    """What each model is doing: loading / waiting, then ready or failed."""
    return dict(_state)


def _warm() -> None:
    try:
        _state["embeddings"] = _run("embeddings", lambda: embedding_provider().warm())
        if "reranker" in _state:
            _state["reranker"] = _run("reranker", _warm_reranker)
        _state["chat"] = _run("chat", lambda: chat_provider().warm())
    finally:
        _done.set()


def _warm_reranker() -> bool:
    cross_encoder = reranker()
    return cross_encoder is None or cross_encoder.warm()


def _run(name: str, warm) -> str:
    try:
        if warm():
            return "ready"
        logger.error("The %s model could not be reached at start; questions will say why.", name)
    except ProviderError as exc:
        logger.error("The %s model could not be loaded: %s", name, exc.message)
    except Exception:
        logger.exception("Warming up the %s model failed", name)
    return "failed"
