"""rag.services.documents: chunk, embed in batches, store atomically, never twice."""

from __future__ import annotations

import math

import pytest
from asgiref.sync import sync_to_async

from rag.models import Chunk, Document, DocumentVector
from rag.providers import ProviderError, embedding_provider
from rag.providers.base import estimate_tokens
from rag.providers.fake import FakeEmbeddings
from rag.services.documents import DocumentInput, EmptyDocumentError, aadd_documents, arebuild_document, content_hash
from rag.services.ingestion import prune_other_models
from tests.factories import BrokenVectors

pytestmark = pytest.mark.django_db(transaction=True)


def sentences(prefix: str, n: int) -> str:
    return " ".join(f"{prefix} sentence {i} is about the topic {prefix}{i}." for i in range(n))


async def counts() -> tuple[int, int]:
    return await Document.objects.acount(), await Chunk.objects.acount()


async def test_add_plain_strings():
    results = await aadd_documents(documents=["# Django\nDjango is a web framework.", "Postgres stores rows."])
    assert [r.created for r in results] == [True, True]
    assert [r.title for r in results] == ["Django", "Postgres stores rows."]  # guessed from the first line
    assert [r.chunks for r in results] == [1, 1]
    doc = await Document.objects.aget(pk=results[0].document_id)
    assert doc.content == "# Django\nDjango is a web framework."
    assert doc.content_hash == content_hash(doc.content)
    chunk = await Chunk.objects.aget(document=doc)
    assert (chunk.position, chunk.heading, chunk.text) == (0, "Django", "Django is a web framework.")


async def test_add_document_inputs_keeps_title_source_and_metadata():
    [result] = await aadd_documents(
        documents=[
            DocumentInput(
                text="  Bananas are yellow.  \n", title="Fruit", source="docs/fruit.md", metadata={"lang": "en"}
            )
        ]
    )
    doc = await Document.objects.aget(pk=result.document_id)
    assert (doc.title, doc.source, doc.metadata) == ("Fruit", "docs/fruit.md", {"lang": "en"})
    assert doc.content == "Bananas are yellow."  # stored stripped
    assert result.title == "Fruit" and result.created


async def test_same_text_twice_is_not_duplicated(fake_llm):
    [first] = await aadd_documents(documents=["Django is a web framework."])
    requests = len(fake_llm.embedding_requests)
    # The same text again, alone, with surrounding whitespace, and twice in one call.
    again = await aadd_documents(
        documents=["Django is a web framework.", DocumentInput(text="\n Django is a web framework. \n", title="Other")]
    )
    assert [(r.document_id, r.created, r.chunks) for r in again] == [(first.document_id, False, 1)] * 2
    assert again[1].title == first.title  # the stored document, not the new input
    assert await counts() == (1, 1)
    assert len(fake_llm.embedding_requests) == requests  # nothing re-embedded


@pytest.mark.parametrize("text", ["", "   ", "\n\t\n"])
async def test_empty_text_raises_and_stores_nothing(fake_llm, text):
    with pytest.raises(EmptyDocumentError, match=r"notes\.md"):
        await aadd_documents(documents=[DocumentInput(text=text, source="notes.md")])
    assert await counts() == (0, 0)
    assert fake_llm.embedding_requests == []


async def test_embedding_failure_raises_and_stores_nothing(fake_llm):
    fake_llm.fault = "embed500"
    with pytest.raises(ProviderError) as excinfo:
        await aadd_documents(documents=[sentences("a", 5)])
    assert excinfo.value.code == "upstream_error"
    assert "embedding server" in excinfo.value.message
    assert await counts() == (0, 0)


async def test_failure_in_a_later_batch_stores_nothing(fake_llm, settings):
    # The fake server fails a request whose text contains the marker: here the last
    # chunk's batch, after earlier batches were embedded successfully.
    settings.RAG_CHUNK_TOKENS = 30
    settings.RAG_CHUNK_OVERLAP = 0
    settings.RAG_EMBED_BATCH = 2
    text = sentences("a", 12) + "\n\nThe very last paragraph says fault=embed500 here."
    with pytest.raises(ProviderError):
        await aadd_documents(documents=[text])
    assert len(fake_llm.embedding_requests) >= 2  # some batches did succeed first
    assert await counts() == (0, 0)


async def test_database_failure_while_storing_chunks_leaves_no_document(settings):
    # The document row is written before its chunks: a failure on the chunks must roll it back.
    settings.RAG_CHUNK_TOKENS = 30
    settings.RAG_CHUNK_OVERLAP = 0
    text = sentences("a", 8) + "\n\nLAST paragraph."
    with pytest.raises(Exception, match="NaN"):
        await aadd_documents(documents=[text], embedder=BrokenVectors(model="broken"))
    assert await counts() == (0, 0)
    # And the knowledge base still works afterwards.
    [result] = await aadd_documents(documents=[text], embedder=FakeEmbeddings(model="fine"))
    assert result.created and result.chunks > 1
    assert await counts() == (1, result.chunks)


async def test_one_failing_document_does_not_undo_the_others(fake_llm):
    with pytest.raises(ProviderError):
        await aadd_documents(documents=["Good document one.", "Bad document: fault=embed500.", "Never reached."])
    assert [d.content async for d in Document.objects.all()] == ["Good document one."]


@pytest.mark.parametrize("batch", [1, 3, 64])
async def test_embedding_batches_respect_setting(fake_llm, settings, batch):
    settings.RAG_EMBED_BATCH = batch
    settings.RAG_CHUNK_TOKENS = 30
    settings.RAG_CHUNK_OVERLAP = 0
    [result] = await aadd_documents(documents=[sentences("b", 14)])
    assert result.chunks >= 5
    sizes = [len(request) for request in fake_llm.embedding_requests]
    assert sum(sizes) == result.chunks
    assert all(size <= batch for size in sizes)
    assert len(sizes) == math.ceil(result.chunks / batch)
    # Sent in chunk order: the texts embedded are the chunks' title+text, position by position.
    embedded = [text for request in fake_llm.embedding_requests for text in request]
    stored = [
        f"{c.document.title}\n\n{c.text}"
        async for c in Chunk.objects.filter(document_id=result.document_id)
        .select_related("document")
        .order_by("position")
    ]
    assert embedded == stored


async def test_chunks_store_model_token_count_and_vectors(fake_llm, settings):
    settings.RAG_CHUNK_TOKENS = 40
    settings.RAG_CHUNK_OVERLAP = 0
    text = "# Guide\n## Part\n" + sentences("c", 10)
    [result] = await aadd_documents(documents=[text])
    embedder = embedding_provider()
    stored = [c async for c in Chunk.objects.filter(document_id=result.document_id).order_by("position")]
    assert len(stored) == result.chunks > 1
    assert [c.position for c in stored] == list(range(len(stored)))
    embedded = [text for request in fake_llm.embedding_requests for text in request]
    for chunk in stored:
        assert chunk.embedding_model == embedder.model == "fake-embed"
        assert chunk.heading == "Guide > Part"
        assert chunk.token_count == estimate_tokens(chunk.text)
        assert len(chunk.embedding) == fake_llm.dimensions
        # The heading path was embedded along with the text (the title is its first heading).
        assert f"Guide > Part\n\n{chunk.text}" in embedded


async def test_same_text_for_a_new_embedding_model_gets_chunks_of_that_model():
    # Chunks are stored per embedding model so that models can be switched without a
    # migration; re-adding the corpus after a switch must make it searchable with the new
    # model, not report it "unchanged" with no chunks for that model.
    old, new = FakeEmbeddings(model="old"), FakeEmbeddings(model="new", dimensions=32)
    [first] = await aadd_documents(documents=["Django is a web framework."], embedder=old)
    [again] = await aadd_documents(documents=["Django is a web framework."], embedder=new)
    assert again.document_id == first.document_id and not again.created
    assert await Document.objects.acount() == 1
    assert await Chunk.objects.filter(embedding_model=new.model).acount() == 1
    assert again.chunks == 1


async def test_adding_several_documents_at_a_time_keeps_order_and_stores_each_whole(settings):
    settings.RAG_CHUNK_TOKENS = 30
    settings.RAG_CHUNK_OVERLAP = 0
    texts = [sentences(f"d{i}", 6) for i in range(6)]
    results = await aadd_documents(documents=texts, concurrency=3)
    assert [r.created for r in results] == [True] * 6
    for text, result in zip(texts, results, strict=True):
        doc = await Document.objects.aget(pk=result.document_id)
        assert doc.content == text
        assert doc.chunk_count == result.chunks == await Chunk.objects.filter(document=doc).acount() > 1
        positions = [c.position async for c in Chunk.objects.filter(document=doc).order_by("position")]
        assert positions == list(range(result.chunks))


async def test_a_failure_among_concurrent_documents_is_raised_and_stores_nothing_of_it(fake_llm):
    with pytest.raises(ProviderError):
        await aadd_documents(documents=["Good one.", "Bad: fault=embed500.", "Good two."], concurrency=2)
    assert not await Document.objects.filter(content__contains="fault=").aexists()
    assert await Chunk.objects.filter(text__contains="fault=").acount() == 0


async def test_text_with_nul_characters_is_stored_without_them():
    [result] = await aadd_documents(documents=["Nul\x00 inside."])
    assert (await Document.objects.aget(pk=result.document_id)).content == "Nul inside."


async def document_vectors(document_id: int) -> dict[str, list[float]]:
    return {
        m: list(v)
        async for m, v in DocumentVector.objects.filter(document_id=document_id).values_list(
            "embedding_model", "embedding"
        )
    }


async def test_a_document_gets_the_mean_of_its_chunks_as_its_vector(settings):
    settings.RAG_CHUNK_TOKENS = 30
    settings.RAG_CHUNK_OVERLAP = 0
    [result] = await aadd_documents(documents=[sentences("m", 8)])
    chunks = [list(c.embedding) async for c in Chunk.objects.filter(document_id=result.document_id)]
    assert len(chunks) > 1
    [(model, vector)] = (await document_vectors(result.document_id)).items()
    assert model == embedding_provider().model
    assert vector == pytest.approx([sum(column) / len(chunks) for column in zip(*chunks, strict=True)], abs=1e-6)


async def test_document_vectors_follow_models_and_new_text():
    old, new = FakeEmbeddings(model="old"), FakeEmbeddings(model="new", dimensions=32)
    [first] = await aadd_documents(documents=["Django is a web framework."], embedder=old)
    await aadd_documents(documents=["Django is a web framework."], embedder=new)
    vectors = await document_vectors(first.document_id)
    assert sorted(vectors) == sorted([new.model, old.model])  # one per model, as the chunks
    assert len(vectors[new.model]) == 32
    # New text makes every model's chunks stale, and their document vectors with them.
    document = await Document.objects.aget(pk=first.document_id)
    await arebuild_document(document=document, embedder=new, text="Flask is a small web framework.")
    vectors = await document_vectors(first.document_id)
    assert list(vectors) == [new.model]
    assert vectors[new.model] == pytest.approx(list((await Chunk.objects.aget(document=document)).embedding), abs=1e-6)


async def test_pruning_other_models_removes_their_document_vectors():
    old, new = FakeEmbeddings(model="old"), FakeEmbeddings(model="new")
    [result] = await aadd_documents(documents=["Postgres stores vectors."], embedder=old)
    await aadd_documents(documents=["Postgres stores vectors."], embedder=new)
    documents = Document.objects.filter(pk=result.document_id)
    await sync_to_async(prune_other_models)(documents=documents, embedding_model=new.model)
    assert list(await document_vectors(result.document_id)) == [new.model]
