from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Value
from django.db.models.functions import Cast
from pgvector.django import CosineDistance, VectorField


class Document(models.Model):
    title = models.CharField(max_length=300)
    source = models.CharField(max_length=1000, blank=True, help_text="Where it came from: a path, a URL.")
    content = models.TextField(help_text="The extracted text; kept so chunks can be rebuilt or re-embedded.")
    content_hash = models.CharField(max_length=64, unique=True, help_text="SHA-256 of the text.")
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.title


class ChunkQuerySet(models.QuerySet):
    def for_model(self, embedding_model: str) -> ChunkQuerySet:
        return self.filter(embedding_model=embedding_model)

    def nearest(self, embedding: list[float] | str, *, embedding_model: str, dimensions: int, k: int) -> ChunkQuerySet:
        """The k chunks closest (cosine) to ``embedding`` among one model's chunks.

        ``embedding`` is a list of floats or pgvector's text literal. Vectors
        are stored untyped so several models can coexist; the cast to a fixed
        dimension and the filter on the model match the partial HNSW
        expression index that rag.services.vector_index creates for that
        model, which is what lets Postgres use the index.
        """
        typed = Cast("embedding", VectorField(dimensions=dimensions))
        query = Value(embedding) if isinstance(embedding, str) else embedding
        return self.for_model(embedding_model).annotate(distance=CosineDistance(typed, query)).order_by("distance")[:k]


class Chunk(models.Model):
    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    position = models.PositiveIntegerField(help_text="Order of the chunk in its document, from 0.")
    text = models.TextField()
    heading = models.CharField(max_length=500, blank=True, help_text="Heading path, e.g. 'Setup > Database'.")
    token_count = models.PositiveIntegerField()
    # No fixed dimension: the dimension belongs to the embedding model, which is
    # recorded per chunk, so switching models needs no migration.
    embedding = VectorField()
    embedding_model = models.CharField(max_length=200, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ChunkQuerySet.as_manager()

    class Meta:
        ordering = ["document", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["document", "embedding_model", "position"], name="rag_chunk_unique_position"
            )
        ]

    def __str__(self) -> str:
        return f"{self.document_id}#{self.position}"


class Conversation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE)
    session_key = models.CharField(max_length=64, blank=True, db_index=True)
    title = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]

    def __str__(self) -> str:
        return self.title or str(self.id)


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"

    class Status(models.TextChoices):
        STREAMING = "streaming"
        COMPLETE = "complete"
        STOPPED = "stopped"
        ERROR = "error"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=16, choices=Role.choices)
    text = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETE, db_index=True)
    error = models.TextField(blank=True)
    sources = models.JSONField(default=list, blank=True)
    model = models.CharField(max_length=200, blank=True)
    retrieval_ms = models.FloatField(null=True, blank=True)
    ttft_ms = models.FloatField(null=True, blank=True, verbose_name="time to first token (ms)")
    total_ms = models.FloatField(null=True, blank=True)
    tokens = models.PositiveIntegerField(null=True, blank=True)
    finish_reason = models.CharField(max_length=32, blank=True)
    k = models.PositiveSmallIntegerField(null=True, blank=True, help_text="Chunks asked for (answers only).")
    # Set by the one stream that generates this answer: a second stream for the
    # same answer (a reconnect, another tab) finds it set and replays instead.
    claimed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.role}: {self.text[:60]}"

    @property
    def tokens_per_second(self) -> float | None:
        """Generation speed after the first token."""
        if not self.tokens or self.tokens < 2 or self.ttft_ms is None or self.total_ms is None:
            return None
        seconds = (self.total_ms - self.ttft_ms) / 1000
        return round((self.tokens - 1) / seconds, 1) if seconds > 0 else None


class Feedback(models.Model):
    class Value(models.TextChoices):
        UP = "up"
        DOWN = "down"

    message = models.OneToOneField(Message, on_delete=models.CASCADE, related_name="feedback")
    value = models.CharField(max_length=8, choices=Value.choices)
    # The chunks retrieved for the answer, kept with the verdict so that a bad
    # answer can be traced to what retrieval fed the model.
    chunk_ids = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]

    def __str__(self) -> str:
        return f"{self.value} on message {self.message_id}"
