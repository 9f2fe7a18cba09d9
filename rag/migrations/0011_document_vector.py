"""Each document's vector per embedding model (the mean of its chunks'), for search to weigh.

The backfill is one INSERT ... SELECT over the chunks: it reads every vector once and
writes one row per document and model, without touching the chunks or their index.
"""

import django.db.models.deletion
import pgvector.django.vector
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("rag", "0010_document_metadata_index"),
    ]

    operations = [
        migrations.CreateModel(
            name="DocumentVector",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("embedding_model", models.CharField(max_length=200)),
                ("embedding", pgvector.django.vector.VectorField()),
                (
                    "document",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="vectors", to="rag.document"
                    ),
                ),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(
                        fields=("document", "embedding_model"), name="rag_documentvector_unique_model"
                    )
                ],
            },
        ),
        migrations.RunSQL(
            "INSERT INTO rag_documentvector (document_id, embedding_model, embedding) "
            "SELECT document_id, embedding_model, avg(embedding) FROM rag_chunk GROUP BY document_id, embedding_model",
            reverse_sql=migrations.RunSQL.noop,
        ),
    ]
