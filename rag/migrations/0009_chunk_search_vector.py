"""Full-text search over chunks: a tsvector kept by a trigger, and its GIN index.

A trigger rather than a generated column: the text-search configuration is the
chunk's own (search_config, from RAG_TEXT_SEARCH_CONFIG), which a generated column
cannot cast, and the document's title is in another table. It also fires for the
binary COPY that stores chunks, so no code path can store a chunk without one.
"""

import django.contrib.postgres.indexes
import django.contrib.postgres.search
from django.db import migrations, models

CREATE = """
CREATE FUNCTION rag_chunk_search_vector() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    config regconfig := NEW.search_config::regconfig;
BEGIN
    NEW.search_vector :=
        setweight(to_tsvector(config, coalesce((SELECT title FROM rag_document WHERE id = NEW.document_id), '')), 'A')
        || setweight(to_tsvector(config, NEW.heading), 'B')
        || to_tsvector(config, NEW.text);
    RETURN NEW;
END
$$;
CREATE TRIGGER rag_chunk_search_vector BEFORE INSERT OR UPDATE OF text, heading, search_config ON rag_chunk
    FOR EACH ROW EXECUTE FUNCTION rag_chunk_search_vector();
"""
DROP = """
DROP TRIGGER rag_chunk_search_vector ON rag_chunk;
DROP FUNCTION rag_chunk_search_vector();
"""


class Migration(migrations.Migration):
    dependencies = [
        ("rag", "0008_document_attempts"),
    ]

    operations = [
        migrations.AddField(
            model_name="chunk",
            name="search_config",
            field=models.CharField(db_default="english", max_length=64),
        ),
        migrations.AddField(
            model_name="chunk",
            name="search_vector",
            field=django.contrib.postgres.search.SearchVectorField(editable=False, null=True),
        ),
        migrations.RunSQL(CREATE, DROP),
        # Chunks stored before this migration: the trigger fills their vectors.
        migrations.RunSQL("UPDATE rag_chunk SET search_config = search_config", migrations.RunSQL.noop),
        migrations.AddIndex(
            model_name="chunk",
            index=django.contrib.postgres.indexes.GinIndex(fields=["search_vector"], name="rag_chunk_search"),
        ),
    ]
