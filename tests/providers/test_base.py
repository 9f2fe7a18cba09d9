from __future__ import annotations

from rag.providers.fake import FakeChat


async def test_complete_collects_the_streamed_reply():
    chat = FakeChat(tokens=["Standalone", " query", "\n"])
    assert await chat.complete([{"role": "user", "content": "q"}], max_tokens=10, temperature=0) == "Standalone query\n"


async def test_complete_respects_max_tokens():
    chat = FakeChat(tokens=["a", "b", "c"])
    assert await chat.complete([], max_tokens=2, temperature=0) == "ab"


def test_the_public_error_keeps_what_to_do_and_drops_where_things_are():
    from rag.providers.base import ProviderError

    error = ProviderError(
        "The LLM server is not reachable at http://10.0.0.5:8000/v1. Start it, or fix OPENAI_BASE_URL. "
        "RAG_LLM_GGUF='/opt/models/x.gguf' is not a file; 3/4 of it was read.",
        code="unreachable",
    )
    public = error.public()
    assert public.code == "unreachable"
    assert public.message == (
        "The LLM server is not reachable at the configured server. Start it, or fix OPENAI_BASE_URL. "
        "RAG_LLM_GGUF='a file on the server' is not a file; 3/4 of it was read."
    )
