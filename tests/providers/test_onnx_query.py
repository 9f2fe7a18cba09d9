"""rag.providers.onnx_query: search queries through ONNX Runtime, with the bundled MiniLM."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling

from rag.providers import onnx_query
from rag.providers.local import LocalEmbeddings

pytestmark = pytest.mark.slow

TEXTS = ["How do I reset my password?", "Postgres 18 with pgvector", "Un café, s'il vous plaît.", "x" * 3000]


@pytest.fixture(scope="module")
def bundled() -> SentenceTransformer:
    return LocalEmbeddings()._load()


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture
def exported_to(settings, onnx_dir: Path) -> Path:
    settings.RAG_ONNX_DIR = onnx_dir
    settings.RAG_ONNX_QUERIES = True
    return onnx_dir


def load(model: SentenceTransformer, name: str = "all-MiniLM-L6-v2") -> onnx_query.OnnxQueryEncoder | None:
    return onnx_query.load(model, name, lock=threading.Lock())


def test_onnx_gives_the_vectors_pytorch_gives(bundled, exported_to):
    encoder = load(bundled)
    assert encoder is not None
    expected = bundled.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    # The long text is truncated as sentence-transformers truncates it (256 tokens).
    assert np.abs(encoder.encode(TEXTS) - expected).max() < 1e-5


def test_the_export_is_made_once_and_reused(bundled, exported_to):
    load(bundled)
    [exported] = exported_to.glob("*.onnx")
    made = exported.stat().st_mtime_ns
    assert load(bundled) is not None
    assert [p.name for p in exported_to.iterdir()] == [exported.name]  # no second file, no partial left
    assert exported.stat().st_mtime_ns == made


async def test_local_embeddings_embed_queries_by_onnx_and_documents_by_pytorch(exported_to):
    embedder = LocalEmbeddings()
    embedder.warm()
    assert isinstance(embedder._query_encoder(), onnx_query.OnnxQueryEncoder)
    queries = await embedder.embed_queries(TEXTS[:2])
    documents = await embedder.embed(TEXTS[:2])
    for query, document in zip(queries, documents, strict=True):
        floats = [float(x) for x in query.literal.strip("[]").split(",")]
        assert np.abs(np.asarray(floats) - np.asarray(document)).max() < 1e-5


def test_a_model_that_does_not_pool_by_the_mean_keeps_pytorch(bundled, exported_to):
    cls_pooled = SentenceTransformer(modules=[bundled[0], Pooling(384, pooling_mode="cls"), bundled[2]], device="cpu")
    assert load(cls_pooled, "cls-pooled") is None
    assert not list(exported_to.glob("cls-pooled*"))


def test_vectors_that_differ_keep_pytorch(bundled, exported_to, monkeypatch):
    monkeypatch.setattr(onnx_query, "_TOLERANCE", -1.0)  # any difference is too much
    assert load(bundled) is None


def test_switched_off_or_not_installed_keeps_pytorch(bundled, exported_to, settings, monkeypatch):
    settings.RAG_ONNX_QUERIES = False
    assert load(bundled) is None
    settings.RAG_ONNX_QUERIES = True
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    assert load(bundled) is None
