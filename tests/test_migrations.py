"""Data migrations that do more than Django's schema operations, on real Postgres."""

from __future__ import annotations

import importlib

import pytest
from django.db import connection

from rag.services import documents
from rag.services.vector_index import index_name
from tests.factories import document_with_chunks
from tests.test_db import unit_vectors

pytestmark = pytest.mark.django_db


def indexdef(name: str) -> str | None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", [name])
        row = cursor.fetchone()
    return row[0] if row else None


def test_0013_indexes_the_document_vectors_of_models_stored_before_it():
    migration = importlib.import_module("rag.migrations.0013_document_vector_index")
    for model, dimensions in (("before-0013-8", 8), ("it's-quoted-16", 16)):
        [chunk, *_] = document_with_chunks(unit_vectors(3, dimensions, seed=1), model=model, title=model)
        documents._store_document_vector(chunk.document, embedding_model=model)
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # as a migration runs: no pending foreign-key checks
    with connection.schema_editor() as editor:
        migration.create(None, editor)
    for model, dimensions in (("before-0013-8", 8), ("it's-quoted-16", 16)):
        # The name vector_index gives it, so that it is not built a second time.
        definition = indexdef(index_name(model, dimensions, table="rag_documentvector"))
        assert definition is not None
        assert f"vector({dimensions})" in definition and "hnsw" in definition
