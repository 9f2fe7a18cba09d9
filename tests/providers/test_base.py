from __future__ import annotations

from rag.providers.fake import FakeChat


async def test_complete_collects_the_streamed_reply():
    chat = FakeChat(tokens=["Standalone", " query", "\n"])
    assert await chat.complete([{"role": "user", "content": "q"}], max_tokens=10, temperature=0) == "Standalone query\n"


async def test_complete_respects_max_tokens():
    chat = FakeChat(tokens=["a", "b", "c"])
    assert await chat.complete([], max_tokens=2, temperature=0) == "ab"
