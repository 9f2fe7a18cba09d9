"""rag.services.prompting: the prompt, fitted to a small context window."""

from __future__ import annotations

from rag.providers.base import estimate_tokens
from rag.providers.fake import FakeChat
from rag.services.prompting import PER_PIECE_TOKENS, build_prompt, fit
from rag.services.retrieval import Source

WORDS = "pgvector stores embeddings beside the rows they describe and searches them with an index "


def source(n: int, *, words: int = 150) -> Source:
    text = (WORDS * (words // 14 + 1)).split()[:words]
    return Source(
        n=n, chunk_id=n, document_id=n, title=f"Doc {n}", source="", heading="", text=" ".join(text), score=0.5
    )


def turns(count: int, *, words: int = 80) -> list[dict[str, str]]:
    history = []
    for i in range(count):
        history += [
            {"role": "user", "content": f"question {i} " + WORDS * (words // 14)},
            {"role": "assistant", "content": f"answer {i} " + WORDS * (words // 14)},
        ]
    return history


def counted(messages: list[dict[str, str]]) -> int:
    """What the prompt costs as ``fit`` counts it (the estimate: FakeChat's tokenizer)."""
    return sum(estimate_tokens(m["content"]) + PER_PIECE_TOKENS for m in messages)


def test_fit_keeps_the_newest_whole_turns_then_the_best_sources():
    # Room 300: the history may use 100, i.e. one turn of 2 x (40 + 8); then 204 are left
    # for sources of 50 + 8 each: three of them.
    assert fit(room=300, sources=[50, 50, 50, 50], history=[40, 40, 40, 40]) == (3, 2)
    assert fit(room=300, sources=[50, 50], history=[]) == (2, 0)
    assert fit(room=300, sources=[400, 50], history=[]) == (0, 0)  # in order: no skipping ahead
    assert fit(room=-5, sources=[1], history=[1, 1]) == (0, 0)


async def test_a_long_conversation_and_k_20_fit_a_2048_token_window_with_room_for_the_reply(settings):
    settings.RAG_CONTEXT_CHARS = 100_000  # only the window limits the sources here
    chat = FakeChat()
    chat.context_tokens = 2048
    sources = [source(n) for n in range(1, 21)]  # k = 20, ~200 tokens each
    history = turns(12)

    messages = await build_prompt(
        chat=chat, question="How do indexes work?", sources=sources, history=history, max_tokens=512
    )

    assert counted(messages) <= 2048 - 512
    assert messages[-1] == {"role": "user", "content": "How do indexes work?"}
    kept = messages[1:-1]
    assert kept and kept == history[-len(kept) :]  # the newest turns, whole
    system = messages[0]["content"]
    assert "[1] Doc 1" in system and "[2] Doc 2" in system and "[20] Doc 20" not in system  # the best first
    unfitted = await build_prompt(  # what was sent before: a model with no known window
        chat=FakeChat(), question="How do indexes work?", sources=sources, history=history, max_tokens=512
    )
    assert counted(unfitted) > 2048


async def test_the_start_of_a_source_too_long_for_the_window_is_better_than_nothing():
    chat = FakeChat()
    chat.context_tokens = 1024
    messages = await build_prompt(
        chat=chat, question="Why?", sources=[source(1, words=2000)], history=[], max_tokens=256
    )
    assert "[1] Doc 1" in messages[0]["content"]
    assert counted(messages) <= 1024 - 256


async def test_a_model_without_a_known_window_gets_the_prompt_as_configured(settings):
    settings.RAG_CONTEXT_CHARS = 100_000
    sources, history = [source(n) for n in range(1, 21)], turns(12)
    messages = await build_prompt(chat=FakeChat(), question="Why?", sources=sources, history=history, max_tokens=512)
    assert messages[1:-1] == history and messages[-1] == {"role": "user", "content": "Why?"}
    assert all(f"[{n}] Doc {n}" in messages[0]["content"] for n in range(1, 21))  # every source, whole
