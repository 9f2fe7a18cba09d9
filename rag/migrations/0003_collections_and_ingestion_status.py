# Collections (with a public "default" one that takes every existing document),
# ingestion status on documents, uploaded files, and text unique per collection.

import django.db.models.deletion
from django.db import migrations, models
from django.db.models import Count, Q


def fill_default_collection(apps, schema_editor):
    Collection = apps.get_model("rag", "Collection")
    Document = apps.get_model("rag", "Document")
    Chunk = apps.get_model("rag", "Chunk")
    default, _ = Collection.objects.get_or_create(
        name="default",
        defaults={"visibility": "public", "description": "Documents added without naming a collection."},
    )
    Document.objects.filter(collection__isnull=True).update(collection=default)
    Chunk.objects.filter(collection__isnull=True).update(collection=default)
    # Existing documents were stored whole, so they are ready.
    for doc in Document.objects.annotate(n=Count("chunks")):
        model = doc.chunks.values_list("embedding_model", flat=True).order_by("-created_at").first() or ""
        Document.objects.filter(pk=doc.pk).update(status="ready", progress=1.0, chunk_count=doc.n, embedding_model=model)
    # Fire the deferred foreign-key checks now: Postgres refuses the ALTER TABLEs
    # below while the updates above leave trigger events pending.
    schema_editor.execute("SET CONSTRAINTS ALL IMMEDIATE")


class Migration(migrations.Migration):

    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("rag", "0002_chat_claim_k_feedback"),
    ]

    operations = [
        migrations.CreateModel(
            name="Collection",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(max_length=100, unique=True)),
                ("description", models.TextField(blank=True)),
                (
                    "visibility",
                    models.CharField(
                        choices=[
                            ("public", "Public: everyone, signed in or not"),
                            ("staff", "Staff only"),
                            ("groups", "Members of the chosen groups"),
                        ],
                        default="public",
                        max_length=16,
                    ),
                ),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                (
                    "groups",
                    models.ManyToManyField(
                        blank=True,
                        help_text="Who may read it when restricted to groups.",
                        related_name="rag_collections",
                        to="auth.group",
                    ),
                ),
            ],
            options={"ordering": ["name"]},
        ),
        migrations.AddField(
            model_name="document",
            name="collection",
            field=models.ForeignKey(
                null=True, on_delete=django.db.models.deletion.PROTECT, related_name="documents", to="rag.collection"
            ),
        ),
        migrations.AddField(
            model_name="chunk",
            name="collection",
            field=models.ForeignKey(
                null=True, on_delete=django.db.models.deletion.CASCADE, related_name="+", to="rag.collection"
            ),
        ),
        migrations.AddField(
            model_name="document",
            name="chunk_count",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AddField(
            model_name="document",
            name="embedding_model",
            field=models.CharField(blank=True, max_length=200),
        ),
        migrations.AddField(
            model_name="document",
            name="error",
            field=models.TextField(blank=True, help_text="Why the last run failed, in words a person can act on."),
        ),
        migrations.AddField(
            model_name="document",
            name="finished_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="document",
            name="progress",
            field=models.FloatField(default=1.0, help_text="0 to 1, within the current run."),
        ),
        migrations.AddField(
            model_name="document",
            name="started_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="document",
            name="status",
            field=models.CharField(
                choices=[
                    ("queued", "Queued"),
                    ("parsing", "Parsing"),
                    ("chunking", "Chunking"),
                    ("embedding", "Embedding"),
                    ("ready", "Ready"),
                    ("failed", "Failed"),
                ],
                db_index=True,
                default="ready",
                max_length=16,
            ),
        ),
        migrations.AddField(
            model_name="document",
            name="timings",
            field=models.JSONField(blank=True, default=dict, help_text="Milliseconds per step of the last run."),
        ),
        migrations.AlterField(
            model_name="document",
            name="content",
            field=models.TextField(
                blank=True, help_text="The extracted text; kept so chunks can be rebuilt or re-embedded."
            ),
        ),
        migrations.AlterField(
            model_name="document",
            name="content_hash",
            field=models.CharField(blank=True, db_index=True, help_text="SHA-256 of the text.", max_length=64),
        ),
        migrations.AlterField(
            model_name="document",
            name="source",
            field=models.CharField(
                blank=True, help_text="Where it came from: a path, a URL, a file name.", max_length=1000
            ),
        ),
        migrations.RunPython(fill_default_collection, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="document",
            name="collection",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.PROTECT, related_name="documents", to="rag.collection"
            ),
        ),
        migrations.AlterField(
            model_name="chunk",
            name="collection",
            field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="+", to="rag.collection"),
        ),
        migrations.AddConstraint(
            model_name="document",
            constraint=models.UniqueConstraint(
                condition=Q(("content_hash", ""), _negated=True),
                fields=("collection", "content_hash"),
                name="rag_document_unique_text_per_collection",
            ),
        ),
        migrations.CreateModel(
            name="DocumentFile",
            fields=[
                (
                    "document",
                    models.OneToOneField(
                        on_delete=django.db.models.deletion.CASCADE,
                        primary_key=True,
                        related_name="file",
                        serialize=False,
                        to="rag.document",
                    ),
                ),
                ("name", models.CharField(max_length=300)),
                ("content_type", models.CharField(blank=True, max_length=200)),
                ("size", models.PositiveBigIntegerField()),
                ("sha256", models.CharField(db_index=True, max_length=64)),
                ("data", models.BinaryField()),
                ("created_at", models.DateTimeField(auto_now_add=True)),
            ],
        ),
    ]
