from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVectorField
from django.db import models
from django.db.models import Q, Value
from django.db.models.expressions import RawSQL
from django.db.models.functions import Cast
from pgvector.django import CosineDistance, VectorField


def storable(text: str) -> str:
    """``text`` as Postgres can store it: a text column cannot hold NUL, and a model,
    a parser or a pasted document can still produce one."""
    return text.replace("\x00", "\ufffd")


@dataclass(frozen=True, slots=True)
class Reader:
    """Someone searching, reduced to what decides which collections they may read.

    A value (hashable), unlike a user or a QuerySet: the search compiles its SQL
    once per kind of reader and reuses it (rag.services.retrieval).
    """

    user_id: int | None = None  # None: anonymous (or an inactive account)
    staff: bool = False
    superuser: bool = False
    # Narrowed to one collection (by id or by name) within what they may read.
    collection_id: int | None = None
    collection_name: str | None = None

    @classmethod
    def of(cls, user: Any) -> Reader:
        if user is None or not user.is_authenticated or not user.is_active:
            return cls()
        return cls(user_id=user.pk, staff=bool(user.is_staff), superuser=bool(user.is_superuser))

    def only(self, *, collection_id: int | None = None, name: str | None = None) -> Reader:
        return replace(self, collection_id=collection_id, collection_name=name or None)

    def collections(self) -> CollectionQuerySet:
        """The collections this reader may search (lazy: a subquery where it is used)."""
        return Collection.objects.readable_by(self)

    async def acollection_named(self, name: str) -> int | None:
        """The id of the collection named ``name`` that this reader may search; None alike
        whether it does not exist or is not theirs, so that a name reveals nothing."""
        return await self.collections().filter(name=name).values_list("pk", flat=True).afirst()


class CollectionQuerySet(models.QuerySet):
    def readable_by(self, who: Any) -> CollectionQuerySet:
        """The collections ``who`` (a user or a Reader) may search (anonymous: the public ones).

        Built from attributes already on the user and a subquery on their
        groups, so it costs no query of its own: used as a filter value it
        becomes part of the search query (one trip to the database).
        """
        reader = who if isinstance(who, Reader) else Reader.of(who)
        scope = self if reader.superuser else self.filter(self._readable(reader))
        if reader.collection_id is not None:
            scope = scope.filter(pk=reader.collection_id)
        if reader.collection_name is not None:
            scope = scope.filter(name=reader.collection_name)
        return scope

    @staticmethod
    def _readable(reader: Reader) -> Q:
        readable = Q(visibility=Collection.Visibility.PUBLIC)
        if reader.user_id is not None:
            if reader.staff:
                readable |= Q(visibility=Collection.Visibility.STAFF)
            # A subquery, not a join: a join on groups would repeat collections.
            memberships = Collection.groups.through.objects.filter(group__user__id=reader.user_id)
            readable |= Q(visibility=Collection.Visibility.GROUPS, pk__in=memberships.values("collection_id"))
        return readable


class Collection(models.Model):
    """A knowledge base: the unit of access control and of deduplication."""

    class Visibility(models.TextChoices):
        PUBLIC = "public", "Public: everyone, signed in or not"
        STAFF = "staff", "Staff only"
        GROUPS = "groups", "Members of the chosen groups"

    DEFAULT_NAME = "default"

    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    visibility = models.CharField(max_length=16, choices=Visibility.choices, default=Visibility.PUBLIC)
    groups = models.ManyToManyField(
        Group, blank=True, related_name="rag_collections", help_text="Who may read it when restricted to groups."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = CollectionQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Document(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        PARSING = "parsing"
        CHUNKING = "chunking"
        EMBEDDING = "embedding"
        READY = "ready"
        FAILED = "failed"

    #: Statuses after which nothing more happens until someone acts.
    SETTLED = (Status.READY, Status.FAILED)

    collection = models.ForeignKey(Collection, on_delete=models.PROTECT, related_name="documents")
    title = models.CharField(max_length=300)
    source = models.CharField(max_length=1000, blank=True, help_text="Where it came from: a path, a URL, a file name.")
    content = models.TextField(
        blank=True, help_text="The extracted text; kept so chunks can be rebuilt or re-embedded."
    )
    # Blank until the text is known (a queued upload); unique per collection otherwise.
    content_hash = models.CharField(max_length=64, blank=True, db_index=True, help_text="SHA-256 of the text.")
    metadata = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.READY, db_index=True)
    progress = models.FloatField(default=1.0, help_text="0 to 1, within the current run.")
    error = models.TextField(blank=True, help_text="Why the last run failed, in words a person can act on.")
    chunk_count = models.PositiveIntegerField(default=0)
    embedding_model = models.CharField(max_length=200, blank=True)
    timings = models.JSONField(default=dict, blank=True, help_text="Milliseconds per step of the last run.")
    attempts = models.PositiveSmallIntegerField(
        default=0, help_text="Runs started since the last one that ended: runs a stopped worker left unfinished."
    )
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        # Metadata filters (``metadata @@ path``): jsonb_path_ops serves their equalities.
        indexes = [GinIndex(fields=["metadata"], opclasses=["jsonb_path_ops"], name="rag_document_metadata")]
        constraints = [
            models.UniqueConstraint(
                fields=["collection", "content_hash"],
                condition=~Q(content_hash=""),
                name="rag_document_unique_text_per_collection",
            )
        ]

    def __str__(self) -> str:
        return self.title


class DocumentFile(models.Model):
    """The uploaded bytes of a document, kept apart so listing documents never loads them.

    Parsing happens in the worker, which may run on another machine than the
    web server: the bytes travel through the database, like the task itself.
    """

    document = models.OneToOneField(Document, on_delete=models.CASCADE, primary_key=True, related_name="file")
    name = models.CharField(max_length=300)
    content_type = models.CharField(max_length=200, blank=True)
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64, db_index=True)
    data = models.BinaryField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class _MatchesJsonPath(models.Func):
    """``jsonb @@ jsonpath``: whether a SQL/JSON path predicate holds (rag.services.metadata_filter)."""

    arg_joiner = " @@ "
    template = "(%(expressions)s::jsonpath)"
    output_field = models.BooleanField()


class ChunkQuerySet(models.QuerySet):
    def for_model(self, embedding_model: str) -> ChunkQuerySet:
        return self.filter(embedding_model=embedding_model)

    def in_collections(self, collections: Reader | Iterable[int] | models.QuerySet | None) -> ChunkQuerySet:
        """Only chunks of these collections (what a Reader may read, ids, or a
        Collection QuerySet; the last two stay a subquery); None: every collection."""
        if collections is None:
            return self
        if isinstance(collections, Reader):
            collections = collections.collections()
        if isinstance(collections, models.QuerySet):
            collections = collections.values("pk")
        return self.filter(collection_id__in=collections)

    def matching(self, jsonpath: str | None) -> ChunkQuerySet:
        """Only chunks of documents whose metadata the SQL/JSON path predicate holds for
        (``MetadataFilter.jsonpath``; None: no condition). A subquery on the documents, so
        that the filter needs no join."""
        if jsonpath is None:
            return self
        documents = Document.objects.filter(_MatchesJsonPath(models.F("metadata"), Value(jsonpath)))
        return self.filter(document_id__in=documents.values("pk"))

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
    # The document's collection, copied so a filtered search needs no join.
    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="+")
    position = models.PositiveIntegerField(help_text="Order of the chunk in its document, from 0.")
    text = models.TextField()
    heading = models.CharField(max_length=500, blank=True, help_text="Heading path, e.g. 'Setup > Database'.")
    token_count = models.PositiveIntegerField()
    # No fixed dimension: the dimension belongs to the embedding model, which is
    # recorded per chunk, so switching models needs no migration.
    embedding = VectorField()
    embedding_model = models.CharField(max_length=200, db_index=True)
    # Full-text search: a trigger (migration 0009) computes search_vector from the
    # document's title, the heading path and the text, with the search_config the
    # chunk was stored with (RAG_TEXT_SEARCH_CONFIG at the time).
    search_config = models.CharField(max_length=64, db_default="english")
    search_vector = SearchVectorField(null=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ChunkQuerySet.as_manager()

    class Meta:
        ordering = ["document", "position"]
        indexes = [GinIndex(fields=["search_vector"], name="rag_chunk_search")]
        constraints = [
            models.UniqueConstraint(
                fields=["document", "embedding_model", "position"], name="rag_chunk_unique_position"
            )
        ]

    def __str__(self) -> str:
        return f"{self.document_id}#{self.position}"


class DocumentVector(models.Model):
    """A document's own vector for one embedding model: the mean of its chunks' vectors.

    Search adds how close the whole document is to the question to how close each chunk
    is (rag.services.search_sql), so that a chunk of a document about the question
    outranks a chunk that only looks like it, inside a long page about something else.
    One row per model, like the chunks, so a re-embedding in progress compares each
    chunk with its document under the same model.
    """

    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="vectors")
    embedding_model = models.CharField(max_length=200)
    embedding = VectorField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["document", "embedding_model"], name="rag_documentvector_unique_model")
        ]

    def __str__(self) -> str:
        return f"{self.document_id} ({self.embedding_model})"


class TermFrequency(models.Model):
    """The share of chunks holding a full-text lexeme, copied from Postgres's own statistics
    of ``Chunk.search_vector`` (``pg_stats.most_common_elems``) by rag.services.term_stats.

    Full-text scores weigh a question's words by how rare they are (BM25's inverse document
    frequency): Postgres's ``ts_rank`` does not. Statistics keep the most common lexemes
    only; a lexeme absent from them is rarer than all of them. The row with the empty
    lexeme (no real one is empty) holds the frequency such lexemes count with.
    """

    lexeme = models.TextField(primary_key=True)
    frequency = models.FloatField()

    def __str__(self) -> str:
        return f"{self.lexeme}: {self.frequency:.4f}"


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


class MessageQuerySet(models.QuerySet):
    def citing_unreadable(self, who: Any) -> MessageQuerySet:
        """Messages citing a document of a collection ``who`` (a user or a Reader) may not read.

        An answer quotes its sources, so such a message is as restricted as that
        collection. A source whose document is gone counts as unreadable.
        Superusers read everything.
        """
        reader = who if isinstance(who, Reader) else Reader.of(who)
        if reader.superuser:
            return self.none()
        readable = Document.objects.filter(collection__in=reader.collections().values("pk")).values("pk")
        sql, params = readable.query.sql_with_params()
        # Self-contained (its own alias), so it can sit inside any outer query.
        restricted = RawSQL(
            f"SELECT m.id FROM {Message._meta.db_table} AS m WHERE EXISTS ("
            "SELECT 1 FROM jsonb_array_elements(m.sources) AS source "
            f"WHERE COALESCE((source ->> 'document_id')::bigint, 0) NOT IN ({sql}))",
            params,
        )
        return self.filter(pk__in=restricted)

    def citing_only_readable(self, who: Any) -> MessageQuerySet:
        """The other messages: those whose sources ``who`` may all read."""
        if (who if isinstance(who, Reader) else Reader.of(who)).superuser:
            return self
        return self.exclude(pk__in=Message.objects.citing_unreadable(who).values("pk"))


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
    # How steadily the tokens came (rag.services.answering.token_gap_stats): a
    # good time to first token can hide a stream that stalls halfway.
    gap_p50_ms = models.FloatField(null=True, blank=True, verbose_name="inter-token gap p50 (ms)")
    gap_p95_ms = models.FloatField(null=True, blank=True, verbose_name="inter-token gap p95 (ms)")
    gap_max_ms = models.FloatField(null=True, blank=True, verbose_name="inter-token gap max (ms)")
    tokens_per_s = models.FloatField(
        null=True, blank=True, verbose_name="tokens/s", help_text="From the first token to the last."
    )
    finish_reason = models.CharField(max_length=32, blank=True)
    k = models.PositiveSmallIntegerField(null=True, blank=True, help_text="Chunks asked for (answers only).")
    collection = models.ForeignKey(
        "Collection",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The collection the question was asked of (answers only); empty: every readable one.",
    )
    # Set by the one stream that generates this answer: a second stream for the
    # same answer (a reconnect, another tab) finds it set and replays instead.
    claimed_at = models.DateTimeField(null=True, blank=True)
    # The answer's id as API clients see it (in its events' ids): it cannot be guessed,
    # so for an anonymous asker it is the capability to resume or stop the answer.
    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = MessageQuerySet.as_manager()

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.role}: {self.text[:60]}"


class AnswerEvents(models.Model):
    """A run of an answer's events, ``first_seq`` to ``last_seq``, as written in one flush.

    Every event of an answer (sources, each token, metrics or error, done) has a sequence
    number that grows by one from 1; a client resumes after the last one it saw. Events
    are written in batches (rag.answers.store), so an answer of 500 tokens is a few dozen
    rows, not 500: ``events`` is a JSON list of ``[kind, data]`` pairs.
    """

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="event_runs")
    first_seq = models.PositiveIntegerField()
    last_seq = models.PositiveIntegerField()
    # JSON as text, not jsonb: jsonb cannot hold a NUL (\u0000), and a token may be one;
    # nothing queries inside it, and the text is what clients are sent back anyway.
    events = models.TextField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["message", "first_seq"], name="answer_events_unique_run")]
        indexes = [models.Index(fields=["message", "last_seq"], name="answer_events_after")]

    def __str__(self) -> str:
        return f"events {self.first_seq}-{self.last_seq} of message {self.message_id}"


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
