"""An HNSW index on the documents' vectors of each model already stored.

Search now proposes the chunks of the documents nearest to a question
(rag.services.search_sql), found through this index; rag.services.vector_index
creates it for models stored from now on. The DDL is repeated here, as migrations
are frozen history: the index's name and shape are vector_index's of this date.
"""

import hashlib

from django.conf import settings
from django.db import migrations
from psycopg.sql import Literal

HNSW_MAX_DIMENSIONS = 2000


def create(apps, schema_editor):
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        cursor.execute("SELECT DISTINCT embedding_model, vector_dims(embedding) FROM rag_documentvector")
        models = cursor.fetchall()
        for embedding_model, dimensions in models:
            if dimensions > HNSW_MAX_DIMENSIONS:
                continue  # searched exactly, as the chunks of such a model are
            digest = hashlib.sha1(f"{embedding_model}:{dimensions}".encode()).hexdigest()[:12]
            model = Literal(embedding_model).as_string(connection.connection)
            cursor.execute(
                f"CREATE INDEX IF NOT EXISTS rag_docvec_hnsw_{digest} ON rag_documentvector "
                f"USING hnsw ((embedding::vector({int(dimensions)})) vector_cosine_ops) "
                f"WITH (m = {int(settings.RAG_HNSW_M)}, ef_construction = {int(settings.RAG_HNSW_EF_CONSTRUCTION)}) "
                f"WHERE embedding_model = {model}"
            )


class Migration(migrations.Migration):
    dependencies = [
        ("rag", "0012_term_frequency"),
    ]

    operations = [
        migrations.RunPython(create, migrations.RunPython.noop),
    ]
