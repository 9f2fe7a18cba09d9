"""The real bundled models, offline: MiniLM embeddings and SmolLM2 through llama.cpp.

These load the models for real (a few seconds), so they are few and share the models.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Iterator

import pytest

from rag import providers as rag_providers
from rag.models import Chunk
from rag.pipeline import RAG
from rag.providers.base import ChatChunk
from rag.providers.local import LlamaCppChat, LocalEmbeddings
from tests.conftest import wait_until

pytestmark = pytest.mark.slow

COUNTING = [{"role": "user", "content": "Count from 1 to 500, one number per line."}]


@pytest.fixture(scope="module")
def embeddings() -> LocalEmbeddings:
    return LocalEmbeddings()


@pytest.fixture(scope="module")
def chat() -> Iterator[LlamaCppChat]:
    provider = LlamaCppChat()
    yield provider
    if provider._llama is not None:
        provider._llama.close()  # now, not in __del__ at interpreter exit when llama_cpp is half torn down


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def generate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "llama-generate" and t.is_alive()]


async def test_embeddings_are_384_d_unit_vectors_that_capture_meaning(embeddings):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # the bundled model never reaches for the hub
    guitar, paraphrase, unrelated = await embeddings.embed(
        [
            "A man is playing the guitar on stage.",
            "Someone performs a song on a guitar at a concert.",
            "Interest rates were raised by the central bank.",
        ]
    )
    for vector in (guitar, paraphrase, unrelated):
        assert len(vector) == 384
        assert math.sqrt(sum(x * x for x in vector)) == pytest.approx(1.0, abs=1e-4)
    assert cosine(guitar, paraphrase) > cosine(guitar, unrelated) + 0.2
    assert await embeddings.embed([]) == []


def test_count_tokens_uses_the_model_tokenizer(embeddings):
    assert embeddings.count_tokens("hello world") == 2
    assert embeddings.count_tokens("Tokenization of unusual words: pgvector!") > 5
    assert embeddings.count_tokens("") == 0


async def test_chat_streams_chunks_and_finishes(chat):
    chunks = [c async for c in chat.stream(COUNTING, max_tokens=8, temperature=0)]
    assert all(isinstance(c, ChatChunk) for c in chunks)
    texts = [c.text for c in chunks if c.text]
    assert 2 <= len(texts) <= 8
    assert chunks[-1].finish_reason in {"length", "stop"}
    assert all(c.finish_reason is None for c in chunks[:-1])
    # The worker thread signals the end just before it returns.
    await asyncio.to_thread(wait_until, lambda: not generate_threads(), timeout=10, what="llama-generate to end")


async def test_closing_the_stream_stops_generation(chat, monkeypatch):
    max_tokens = 400
    llama = chat._load()
    produced: list[dict] = []
    original = llama.create_chat_completion

    def counting_completion(*args, **kwargs):
        for part in original(*args, **kwargs):
            produced.append(part)
            yield part

    monkeypatch.setattr(llama, "create_chat_completion", counting_completion)
    before = set(threading.enumerate())
    stream = chat.stream(COUNTING, max_tokens=max_tokens, temperature=0)
    first = await anext(stream)
    assert first.text
    [thread] = [t for t in generate_threads() if t not in before]
    await stream.aclose()

    await asyncio.to_thread(wait_until, lambda: not thread.is_alive(), timeout=10, what="llama-generate to end")
    assert not generate_threads()
    # Generation stopped far short of max_tokens: the prompt asks for hundreds of lines.
    assert len(produced) < max_tokens // 2, len(produced)
    # The model is free again: a new request is not blocked behind the abandoned one.
    again = [c async for c in chat.stream(COUNTING, max_tokens=4, temperature=0)]
    assert again[-1].finish_reason == "length"


@pytest.mark.django_db(transaction=True)
async def test_whole_pipeline_on_the_local_models(settings):
    settings.RAG_CHAT_PROVIDER = "local"
    settings.RAG_EMBEDDING_PROVIDER = "local"
    settings.RAG_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
    settings.RAG_CHAT_MODEL = ""
    settings.RAG_LLM_GGUF = ""
    settings.RAG_MAX_TOKENS = 16
    settings.RAG_TEMPERATURE = 0.0
    try:
        rag = RAG()
        results = await rag.aadd(
            [
                "Bananas are a tropical fruit, rich in potassium and usually yellow when ripe.",
                "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
                "Django is a high-level Python web framework.",
            ]
        )
        assert all(r.created and r.chunks == 1 for r in results)
        assert await Chunk.objects.filter(embedding_model="all-MiniLM-L6-v2").acount() == 3
        answer = await rag.aask("Which fruit contains a lot of potassium?", k=2)
        assert answer.ok, answer.error
        assert answer.text.strip()
        assert len(answer.sources) == 2
        assert "Bananas" in answer.sources[0].text  # retrieval by meaning, not by shared words only
        assert answer.metrics is not None and answer.metrics.tokens <= 16
        assert answer.metrics.embedding_model == "all-MiniLM-L6-v2"
    finally:
        # Drop the providers built for these settings while llama_cpp can still free its model.
        rag_providers._chat.cache_clear()
        rag_providers._embeddings.cache_clear()
