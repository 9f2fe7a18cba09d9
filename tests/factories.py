"""Test data: documents with chunks embedded by whichever provider the settings choose, and
answers being written."""

from __future__ import annotations

import math

from django.contrib.auth.models import Group

from rag.models import Chunk, Collection, Document, Message
from rag.providers.fake import FakeEmbeddings
from rag.services import answer_rows
from rag.services.documents import DocumentInput, aadd_documents, default_collection

CORPUS = {
    "Django": "Django is a high-level Python web framework that encourages rapid development.",
    "pgvector": "pgvector adds vector similarity search to Postgres, with HNSW and IVFFlat indexes.",
    "Bananas": "Bananas are yellow fruit rich in potassium, grown in tropical climates.",
    "SSE": "Server-Sent Events stream text from a server to a browser over one HTTP response.",
}


async def add_corpus(corpus: dict[str, str] | None = None) -> list[Document]:
    results = await aadd_documents(
        documents=[DocumentInput(text=text, title=title) for title, text in (corpus or CORPUS).items()]
    )
    return [await Document.objects.aget(pk=r.document_id) for r in results]


def group_collection(name: str = "secret", *, group: str = "members") -> tuple[Collection, Group]:
    """A collection only the members of a group (made here) may read."""
    members = Group.objects.create(name=group)
    collection = Collection.objects.create(name=name, visibility=Collection.Visibility.GROUPS)
    collection.groups.add(members)
    return collection, members


async def agroup_collection(name: str = "secret", *, group: str = "members") -> tuple[Collection, Group]:
    members = await Group.objects.acreate(name=group)
    collection = await Collection.objects.acreate(name=name, visibility=Collection.Visibility.GROUPS)
    await collection.groups.aadd(members)
    return collection, members


class BrokenVectors(FakeEmbeddings):
    """Embeds fine, except that the vector of a text holding "LAST" is NaN, which pgvector
    refuses to store: a failure in the middle of storing a document's chunks."""

    async def embed(self, texts: list[str]) -> list[list[float]]:
        vectors = await super().embed(texts)
        if "LAST" in texts[-1]:
            vectors[-1] = [math.nan] * self.dimensions
        return vectors


def document_with_chunks(
    vectors: list[list[float]], *, model: str, title: str = "bulk", texts: list[str] | None = None
) -> list[Chunk]:
    """One document in the default collection whose chunks have these vectors (and texts,
    by default "<model> #<n>"), stored directly: for tests of search itself."""
    collection = default_collection()
    texts = texts or [f"{model} #{i}" for i in range(len(vectors))]
    document = Document.objects.create(
        collection=collection, title=title, content="\n\n".join(texts), content_hash=f"{title}-{model}"
    )
    return Chunk.objects.bulk_create(
        Chunk(
            document=document,
            collection=collection,
            position=i,
            text=text,
            token_count=len(text.split()),
            embedding=vector,
            embedding_model=model,
        )
        for i, (vector, text) in enumerate(zip(vectors, texts, strict=True))
    )


async def streaming_answers(n: int) -> list[Message]:
    """``n`` answers of anonymous questions, claimed and streaming, in id order."""
    return [
        await answer_rows.open_new_turn(question=f"q{i}?", user_id=None, session_key="tests", model="m", k=1)
        for i in range(n)
    ]
