"""Background ingestion: submit files or text, then parse → chunk → embed → store in the worker.

Submitting writes the document (status ``queued``), its bytes and the task in
one transaction, so the worker never sees a task without its document or the
reverse. The worker moves the document through parsing, chunking, embedding
to ready (or failed, with a reason a person can act on), saving each step so
the admin shows it live. Chunks are swapped in only at the end, atomically.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import PurePath

from asgiref.sync import sync_to_async
from django.core.files import File
from django.db import connection, transaction
from django.db.models import Count, F, Q, QuerySet, Sum
from django.utils import timezone

from rag.models import Collection, Document, DocumentFile
from rag.providers import EmbeddingProvider, ProviderError, embedding_provider
from rag.services import documents as docs
from rag.services import parse_sandbox
from rag.services.parsing import ParseError, check_upload, decode_text, kind_of

logger = logging.getLogger(__name__)

#: A run whose document has not been updated for this long is taken for dead.
STALE_AFTER = timedelta(minutes=15)
#: The first key of the advisory lock that serializes submissions to a collection.
SUBMIT_LOCK = 0x5241_4701
#: Runs a worker may leave unfinished (killed, out of memory) before the document is taken
#: for what kills it and marked failed instead of being queued again.
MAX_ATTEMPTS = 3
GAVE_UP = (
    "The worker stopped {n} times while processing this document (killed, out of memory or crashed): "
    "the file is probably what stops it. Fix or replace it, then re-ingest it."
)


@dataclass(frozen=True)
class Submission:
    name: str
    outcome: str  # queued | replacing | duplicate | failed
    message: str
    document_id: int | None = None


def submit_file(*, collection: Collection, name: str, data: bytes, content_type: str = "") -> Submission:
    """Queue one uploaded file. Bad files that can be told at once (type, empty, size) become
    failed documents with the reason; a file already in the collection is refused."""
    name = PurePath(name).name or "upload"
    try:
        check_upload(name=name, size=len(data))
    except ParseError as exc:
        document = _failed_document(collection=collection, name=name, error=exc.message)
        return Submission(name, "failed", f"Failed: {exc.message}", document.pk)
    digest = hashlib.sha256(data).hexdigest()
    with transaction.atomic():
        # One submission to a collection at a time, to its commit: two uploads of one file
        # at the same moment both found no duplicate and made two documents, the second
        # failing later as a duplicate (and two of one name made two documents of it).
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [SUBMIT_LOCK, collection.pk])
        existing = _duplicate(collection=collection, name=name, data=data, digest=digest)
        if existing is not None:
            return Submission(
                name,
                "duplicate",
                f"Not added: {name} already exists in “{collection}” as “{existing.title}”.",
                existing.pk,
            )
        return _queue(collection=collection, name=name, data=data, digest=digest, content_type=content_type)


def submit_upload(*, collection: Collection, upload: File) -> Submission:
    """Queue an uploaded file (a Django File); one over the size limit is refused before it is read."""
    name = PurePath(upload.name or "upload").name
    try:
        check_upload(name=name, size=upload.size or 0)
    except ParseError as exc:
        document = _failed_document(collection=collection, name=name, error=exc.message)
        return Submission(name, "failed", f"Failed: {exc.message}", document.pk)
    upload.seek(0)
    return submit_file(
        collection=collection, name=name, data=upload.read(), content_type=getattr(upload, "content_type", "") or ""
    )


def submit_text(*, collection: Collection, title: str, text: str) -> Submission:
    """Queue pasted text: stored like a Markdown file named after its title."""
    title = title.strip() or docs.guess_title(text)
    data = text.strip().encode("utf-8")
    return submit_file(collection=collection, name=f"{title}.md", data=data, content_type="text/markdown")


def requeue(
    *, documents: QuerySet[Document], reembed: bool = False, stale_after: timedelta = STALE_AFTER, fresh: bool = True
) -> int:
    """Queue re-ingestion (parse again) or re-embedding (same text, current model) of documents.

    Documents still being processed are skipped: their run will finish first. A run
    saves its progress at least once per embedding batch, so one that has not moved for
    ``stale_after`` is taken for dead (a worker killed mid-run) and may be queued again.
    ``fresh`` (someone asked) starts the count of unfinished runs again.
    """
    from rag import tasks

    task = tasks.reembed_document if reembed else tasks.ingest_document
    stale = timezone.now() - stale_after
    eligible = documents.filter(Q(status__in=Document.SETTLED) | Q(updated_at__lt=stale))
    reset = {"attempts": 0} if fresh else {}
    count = 0
    for pk in list(eligible.values_list("pk", flat=True)):
        with transaction.atomic():
            Document.objects.filter(pk=pk).update(
                status=Document.Status.QUEUED, progress=0.0, error="", updated_at=timezone.now(), **reset
            )
            task.enqueue(document_id=pk)
        count += 1
    return count


def requeue_interrupted(*, stale_after: timedelta = STALE_AFTER) -> tuple[int, int]:
    """Queue again the documents a worker stopped in the middle of (killed, restarted);
    (queued again, given up on).

    The task queue does not notice a worker that died: its task stays "running" and
    the document stays parsing, chunking or embedding for good. With several
    workers, only a run that has not moved for ``stale_after`` can be told dead; a
    worker starting when no other runs (``make run``) may pass zero. A document whose
    runs were left unfinished MAX_ATTEMPTS times is marked failed rather than queued
    again: a file that kills the worker would otherwise kill it at every start. The task
    rows of those dead runs are marked failed too.
    """
    stale = timezone.now() - stale_after
    interrupted = Document.objects.exclude(status__in=(*Document.SETTLED, Document.Status.QUEUED))
    poison = interrupted.filter(attempts__gte=MAX_ATTEMPTS, updated_at__lte=stale)
    given_up = 0
    for document in poison.only("pk", "attempts"):
        DocumentFile.objects.filter(document=document).delete()  # what stops the worker, most likely
        given_up += Document.objects.filter(pk=document.pk).update(
            status=Document.Status.FAILED,
            error=GAVE_UP.format(n=document.attempts),
            finished_at=timezone.now(),
            updated_at=timezone.now(),
        )
    _reap_dead_runs(stale=stale)
    return requeue(documents=interrupted, stale_after=stale_after, fresh=False), given_up


def _reap_dead_runs(*, stale: datetime) -> int:
    """Mark failed the task rows that a stopped worker left "running" (ingestion's, not
    started since ``stale``), so that the queue shows what happened to them."""
    from django_tasks.base import TaskResultStatus
    from django_tasks_db.models import DBTaskResult

    from rag import tasks

    paths = [t.module_path for t in (tasks.ingest_document, tasks.reembed_document)]
    return DBTaskResult.objects.filter(
        status=TaskResultStatus.RUNNING, task_path__in=paths, started_at__lte=stale
    ).update(
        status=TaskResultStatus.FAILED,
        finished_at=timezone.now(),
        exception_class_path="rag.services.ingestion.WorkerStopped",
        traceback="The worker running this task stopped before it ended (killed or restarted).",
    )


def _duplicate(*, collection: Collection, name: str, data: bytes, digest: str) -> Document | None:
    same_file = DocumentFile.objects.filter(document__collection=collection, sha256=digest).select_related("document")
    if match := same_file.first():
        return match.document
    if kind_of(name) == "text":
        # Plain text: the text hash is known without parsing, and catches the
        # same text added from the command line or pasted.
        try:
            text = decode_text(name=name, data=data).strip()
        except ParseError:
            return None
        return Document.objects.filter(collection=collection, content_hash=docs.content_hash(text)).first()
    return None


def _queue(*, collection: Collection, name: str, data: bytes, digest: str, content_type: str) -> Submission:
    from rag import tasks

    with transaction.atomic():
        document = Document.objects.select_for_update().filter(collection=collection, source=name).first()
        replacing = document is not None
        if document is None:
            document = Document.objects.create(
                collection=collection,
                title=PurePath(name).stem[:300] or name,
                source=name,
                status=Document.Status.QUEUED,
                progress=0.0,
            )
        else:
            # Same name, new content: the document keeps answering from its old
            # chunks until the new version is ready.
            document.status, document.progress, document.error = Document.Status.QUEUED, 0.0, ""
            document.save(update_fields=["status", "progress", "error", "updated_at"])
        DocumentFile.objects.update_or_create(
            document=document,
            defaults={
                "name": name,
                "content_type": content_type[:200],
                "size": len(data),
                "sha256": digest,
                "data": data,
            },
        )
        tasks.ingest_document.enqueue(document_id=document.pk)
    if replacing:
        return Submission(
            name,
            "replacing",
            f"Queued: {name} replaces the document of that name in “{collection}”; "
            "its old version answers until the new one is ready.",
            document.pk,
        )
    return Submission(name, "queued", f"Queued: {name}.", document.pk)


def _failed_document(*, collection: Collection, name: str, error: str) -> Document:
    return Document.objects.create(
        collection=collection,
        title=PurePath(name).stem[:300] or name,
        source=name,
        status=Document.Status.FAILED,
        progress=0.0,
        error=error,
        finished_at=timezone.now(),
    )


# --- the worker's side -----------------------------------------------------------------


async def aingest(*, document_id: int, embedder: EmbeddingProvider | None = None) -> str:
    """Parse, chunk, embed and store one queued document; returns its final status."""
    return await _run(document_id=document_id, embedder=embedder, reembed=False)


async def areembed(*, document_id: int, embedder: EmbeddingProvider | None = None) -> str:
    """Embed a document's stored text with the current model; its chunks of other
    models keep answering meanwhile and stay until pruned."""
    return await _run(document_id=document_id, embedder=embedder, reembed=True)


async def _run(*, document_id: int, embedder: EmbeddingProvider | None, reembed: bool) -> str:
    document = await Document.objects.filter(pk=document_id).afirst()
    if document is None:
        return "gone"  # deleted while queued: nothing to do
    had_chunks = await document.chunks.aexists()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    await _mark(document, status=Document.Status.PARSING, progress=0.0, started_at=timezone.now(), error="")
    # Counted in the database at once: if this run kills the worker, the count says so.
    await Document.objects.filter(pk=document.pk).aupdate(attempts=F("attempts") + 1)
    try:
        embedder = embedder or embedding_provider()

        async def on_progress(fraction: float) -> None:
            # Embedding is most of the work: it spans 10%..95% of the bar.
            await _mark(document, status=Document.Status.EMBEDDING, progress=round(0.1 + 0.85 * fraction, 3))

        if reembed:
            await _mark(document, status=Document.Status.CHUNKING, progress=0.1)
            await docs.aembed_document(document=document, embedder=embedder, on_progress=on_progress)
        else:
            text, title = await _parse(document, timings)
            await _mark(document, status=Document.Status.CHUNKING, progress=0.1)
            await docs.arebuild_document(
                document=document, embedder=embedder, text=text, on_progress=on_progress, timings=timings
            )
            if title and not document.metadata.get("title"):
                document.metadata["title"] = title
    except (ParseError, docs.EmptyDocumentError, docs.DuplicateDocumentError) as exc:
        # The file itself is the problem: its bytes would only take room. A fixed file is a new upload.
        await DocumentFile.objects.filter(document=document).adelete()
        return await _fail(document, message=getattr(exc, "message", str(exc)), had_chunks=had_chunks)
    except ProviderError as exc:  # the file is fine: kept, to re-ingest once the provider is back
        return await _fail(document, message=exc.message, had_chunks=had_chunks)
    except Exception as exc:
        logger.exception("Ingestion of document %s failed", document_id)
        message = f"Ingestion failed unexpectedly ({type(exc).__name__}: {str(exc)[:200]}); see the worker log."
        return await _fail(document, message=message, had_chunks=had_chunks)
    timings["total_ms"] = round((time.perf_counter() - started) * 1000, 1)
    await Document.objects.filter(pk=document.pk).aupdate(timings=timings, metadata=document.metadata, attempts=0)
    return Document.Status.READY


async def _parse(document: Document, timings: dict[str, float]) -> tuple[str, str]:
    started = time.perf_counter()
    upload = await DocumentFile.objects.filter(document=document).afirst()
    if upload is None:
        # Added from the command line or the API: the stored text is the source.
        return document.content, ""
    # In a child process with a time and memory limit (rag.services.parse_sandbox); a thread
    # waits for it, off the loop.
    parsed = await sync_to_async(parse_sandbox.parse, thread_sensitive=False)(name=upload.name, data=bytes(upload.data))
    timings["parse_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return parsed.text, parsed.title


async def _mark(document: Document, **fields: object) -> None:
    for name, value in fields.items():
        setattr(document, name, value)
    await Document.objects.filter(pk=document.pk).aupdate(**fields, updated_at=timezone.now())


async def _fail(document: Document, *, message: str, had_chunks: bool) -> str:
    if had_chunks:
        message += " The previous version is still searchable."
    await _mark(document, status=Document.Status.FAILED, error=message, finished_at=timezone.now(), attempts=0)
    return Document.Status.FAILED


# --- what the admin shows -------------------------------------------------------------------


def status_of(*, documents: QuerySet[Document]) -> list[dict[str, object]]:
    """The live fields of documents, for the change list's poller."""
    fields = ("pk", "status", "progress", "error", "chunk_count", "embedding_model")
    return [dict(zip(fields, row, strict=True)) for row in documents.values_list(*fields)]


def upload_bytes(*, documents: QuerySet[Document]) -> tuple[int, int]:
    """(uploaded files kept, their bytes): what the uploads of ``documents`` hold in the database."""
    kept = DocumentFile.objects.filter(document__in=documents).aggregate(files=Count("pk"), size=Sum("size"))
    return kept["files"], kept["size"] or 0


def embedding_coverage(*, documents: QuerySet[Document], embedding_model: str) -> tuple[int, int]:
    """(documents with chunks of ``embedding_model``, documents with any chunks): how far a re-embedding is."""
    from rag.models import Chunk

    with_chunks = documents.filter(chunk_count__gt=0)
    done = with_chunks.filter(pk__in=Chunk.objects.filter(embedding_model=embedding_model).values("document_id"))
    return done.count(), with_chunks.count()


def prune_other_models(*, documents: QuerySet[Document], embedding_model: str) -> int:
    """Delete chunks of other embedding models, once ``embedding_model`` covers every document."""
    from rag.models import Chunk, DocumentVector

    DocumentVector.objects.filter(document__in=documents).exclude(embedding_model=embedding_model).delete()
    deleted, _ = Chunk.objects.filter(document__in=documents).exclude(embedding_model=embedding_model).delete()
    return deleted
