"""The Python API, as the seed tutorial teaches it::

    from rag.python_api import RAG

    rag = RAG()
    await rag.aadd(["Django is a web framework.", ...])
    print(await rag.aquery("What is Django?", k=4))
    async for token in rag.astream("What is Django?", k=4):
        print(token, end="", flush=True)

``aask`` returns the answer with its sources and metrics, and ``aevents`` is
the full event stream the web layer uses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from rag.models import Collection
from rag.providers import ChatProvider, EmbeddingProvider, ProviderError
from rag.services import answering
from rag.services.documents import AddResult, DocumentInput, aadd_documents
from rag.services.metadata_filter import MetadataFilter
from rag.services.retrieval import Source


@dataclass
class Answer:
    text: str
    sources: list[Source]
    metrics: answering.Metrics | None = None
    error: answering.Error | None = None
    tokens: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


class RAG:
    def __init__(self, *, chat: ChatProvider | None = None, embedder: EmbeddingProvider | None = None) -> None:
        # None: the providers the settings choose, resolved on each call.
        self.chat = chat
        self.embedder = embedder

    async def aadd(
        self, texts_or_documents: Iterable[str | DocumentInput], *, collection: Collection | None = None
    ) -> list[AddResult]:
        """Add to ``collection`` (default: the public "default" collection)."""
        return await aadd_documents(documents=texts_or_documents, embedder=self.embedder, collection=collection)

    def aevents(
        self, question: str, *, k: int | None = None, metadata: Any = None, **context
    ) -> AsyncIterator[answering.AnswerEvent]:
        """The answer's events. ``metadata``: a filter on the documents' metadata, as a dict
        ({"tags": "faq", "year": {"gte": 2020}}: rag.services.metadata_filter); an invalid
        one raises FilterError at once."""
        return answering.stream_answer(
            question=question,
            k=k or settings.RAG_DEFAULT_K,
            chat=self.chat,
            embedder=self.embedder,
            metadata=MetadataFilter.parse(metadata),
            **context,
        )

    async def astream(self, question: str, *, k: int | None = None, **context) -> AsyncIterator[str]:
        """Yield the answer one token at a time; raises ProviderError on failure."""
        async with aclosing(self.aevents(question, k=k, **context)) as events:
            async for event in events:
                if isinstance(event, answering.Token):
                    yield event.text
                elif isinstance(event, answering.Error):
                    raise ProviderError(event.message, code=event.code)

    async def aask(self, question: str, *, k: int | None = None, **context) -> Answer:
        answer = Answer(text="", sources=[])
        async with aclosing(self.aevents(question, k=k, **context)) as events:
            async for event in events:
                match event:
                    case answering.Sources(sources=sources):
                        answer.sources = sources
                    case answering.Token(text=text):
                        answer.tokens.append(text)
                    case answering.Metrics():
                        answer.metrics = event
                    case answering.Error():
                        answer.error = event
        answer.text = "".join(answer.tokens)
        return answer

    async def aquery(self, question: str, *, k: int | None = None, **context) -> str:
        """The answer text; raises ProviderError on failure."""
        answer = await self.aask(question, k=k, **context)
        if answer.error:
            raise ProviderError(answer.error.message, code=answer.error.code)
        return answer.text
