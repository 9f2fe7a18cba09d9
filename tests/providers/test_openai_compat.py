from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest
from django.db import connection

from rag import providers
from rag.providers import ProviderError, QueryVector, embedding_provider, openai_compat
from tests.processes import app_env, start_daphne


async def test_query_vector_keeps_the_servers_numbers_as_text(fake_llm):
    embedder = embedding_provider()
    [floats] = await embedder.embed(["vector search"])
    query = await embedder.embed_query("vector search")
    assert query.dimensions == len(floats) == 64
    assert query.literal.startswith("[") and query.literal.endswith("]")
    assert json.loads(query.literal) == pytest.approx(floats)


def test_query_vector_from_floats_is_a_pgvector_literal():
    query = QueryVector.from_floats([0.5, -1.0, 1e-05])
    assert query == QueryVector(literal="[0.5,-1.0,1e-05]", dimensions=3)


async def test_concurrent_queries_share_embedding_requests_and_get_their_own_vectors(fake_llm):
    embedder = embedding_provider()
    questions = [f"question number {i} about topic {i * 7}" for i in range(20)]
    alone = [await embedder.embed_query(q) for q in questions[:3]]
    fake_llm.reset()
    together = await asyncio.gather(*(embedder.embed_query(q) for q in questions))
    assert together[:3] == alone  # batching changes nothing about a query's vector
    assert len(set(together)) == len(questions)
    sent = fake_llm.embedding_requests
    assert sorted(t for request in sent for t in request) == sorted(questions)  # each sent once
    assert len(sent) < len(questions)  # but not one request each


async def test_a_query_that_fails_a_shared_request_fails_alone(fake_llm):
    embedder = embedding_provider()
    questions = ["first fine question", "poisoned one fault=embed500", "second fine question", "third"]
    results = await asyncio.gather(*(embedder.embed_query(q) for q in questions), return_exceptions=True)
    assert isinstance(results[1], ProviderError) and results[1].code == "upstream_error"
    assert all(isinstance(r, QueryVector) for i, r in enumerate(results) if i != 1)
    assert any(len(request) > 1 for request in fake_llm.embedding_requests)  # it was batched, then split


def test_a_short_lived_loop_closes_the_clients_it_opened(fake_llm):
    # A management command's asyncio.run: without closing, the connections leak and
    # aiohttp prints "Unclosed client session" when the command exits.
    async def main():
        await embedding_provider().embed(["anything"])
        loop = asyncio.get_running_loop()
        [client] = openai_compat._clients[loop].values()
        assert not client.is_closed()
        return loop, client

    loop, client = providers.run(main())
    assert client.is_closed()
    assert loop not in openai_compat._clients  # nothing kept for the dead loop


SHARED_TRICKY = Path(__file__).resolve().parents[3] / "shared" / "bench" / "tricky_tokens.json"


def upstream_tricky_tokens() -> list[str]:
    """The shared bench's tricky tokens (this repository's own list when ../shared is absent)."""
    if SHARED_TRICKY.is_file():
        return json.loads(SHARED_TRICKY.read_text())
    from tests.web.test_sse import TRICKY_TOKENS

    return TRICKY_TOKENS


@pytest.mark.parametrize("raw", [False, True], ids=["escaped", "raw-like-llama.cpp"])
async def test_every_tricky_token_from_the_upstream_arrives_exactly(fake_llm, raw):
    """U+2028, NEL, VT, FF and FS/GS/RS are line ends for str.splitlines(), not for SSE:
    sent raw inside the upstream's JSON, they must not cut a chunk in two."""
    tokens = [t for t in upstream_tricky_tokens() if t]  # an empty delta carries nothing
    assert any(c in "".join(tokens) for c in "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e")
    fake_llm.tokens = tokens
    fake_llm.raw_json = raw
    chunks = [
        c
        async for c in providers.chat_provider().stream(
            [{"role": "user", "content": "hi"}], max_tokens=99, temperature=0
        )
    ]
    assert [c.text for c in chunks if c.text] == tokens
    assert chunks[-1].finish_reason == "stop"


async def test_data_lines_end_only_at_cr_lf_or_crlf_whatever_the_reads():
    body = b'data: {"a": "x\xe2\x80\xa8y\x0bz"}\r\n\r\ndata: 2\rdata: 3\n\ndata: [DONE]'

    class Response:
        def __init__(self, size: int) -> None:
            self.size = size

        async def aiter_bytes(self):
            for i in range(0, len(body), self.size):
                yield body[i : i + self.size]

    for size in (1, 2, 3, 7, len(body)):
        got = [d async for d in openai_compat.sse_data(Response(size))]
        assert got == ['{"a": "x\u2028y\x0bz"}'.encode(), b"2", b"3", b"[DONE]"], size


@pytest.mark.django_db(transaction=True)
def test_a_server_closes_its_clients_when_it_stops(fake_server):
    """daphne's loop keeps the clients for its lifetime; stopping must not leak them."""
    web = start_daphne(app_env(connection.settings_dict["NAME"], fake_server.base_url))
    try:
        with urllib.request.urlopen(f"{web.url}/rag/stream?question=hello", timeout=20) as response:
            assert b"[DONE]" in response.read()
    finally:
        web.stop()
    assert web.proc.returncode == 0
    assert "GET /rag/stream" in web.log()
    assert "Unclosed client session" not in web.log()


async def test_a_timeout_before_the_first_byte_says_how_often_it_was_waited_for(fake_llm, settings):
    # The client retries a timeout too: the message must not claim one wait when there were two.
    settings.RAG_LLM_TIMEOUT = 0.3
    settings.RAG_LLM_MAX_RETRIES = 1
    with pytest.raises(ProviderError) as raised:
        await embedding_provider().embed(["a question fault=embed_hang"])
    assert raised.value.code == "timeout"
    assert "within 0.3 s, 2 times" in raised.value.message
    assert len(fake_llm.embedding_requests) == 2
