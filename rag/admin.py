"""The knowledge base in the admin: upload, live status, actions, chunks, and a query tester.

Thin: every view and action calls a service (rag.services.ingestion,
rag.services.retrieval). Staff see only documents of collections they may
read, the same rule the chat and the API apply.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.template.defaultfilters import filesizeformat
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from rag import providers
from rag.forms import TryQueryForm, UploadForm
from rag.models import Chunk, Collection, Conversation, Document, Feedback, Message
from rag.providers import ProviderError, embedding_provider
from rag.services import ingestion, retrieval

T = TypeVar("T")


def readable(request: HttpRequest) -> QuerySet[Collection]:
    return Collection.objects.readable_by(request.user)


class BaseAdmin(admin.ModelAdmin):
    """The app's admins."""

    def get_changelist_instance(self, request: HttpRequest):
        # Postgres refuses text holding a NUL: a filter value with one (?status__exact=%00) was a
        # 500. Treated as any other bad filter: back to the list, unfiltered.
        if any("\x00" in value for _, values in request.GET.lists() for value in values):
            raise IncorrectLookupParameters("A filter value holds a NUL character.")
        return super().get_changelist_instance(request)


@admin.register(Collection)
class CollectionAdmin(BaseAdmin):
    list_display = ("name", "visibility", "document_count", "created_at")
    list_filter = ("visibility",)
    search_fields = ("name",)
    filter_horizontal = ("groups",)
    actions = ["reembed_all"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Collection]:
        return super().get_queryset(request).filter(pk__in=readable(request).values("pk"))

    @admin.display(description="documents")
    def document_count(self, obj: Collection) -> int:
        return obj.documents.count()

    @admin.action(description="Re-chunk and re-embed every document with the current settings (in the background)")
    def reembed_all(self, request: HttpRequest, queryset: QuerySet[Collection]) -> None:
        count = ingestion.requeue(documents=Document.objects.filter(collection__in=queryset), reembed=True)
        self.message_user(
            request, f"{count} document(s) queued for re-embedding; search keeps using the current chunks meanwhile."
        )


@admin.register(Document)
class DocumentAdmin(BaseAdmin):
    list_display = (
        "title",
        "collection",
        "status_cell",
        "chunks_cell",
        "model_cell",
        "upload_cell",
        "took",
        "updated_at",
    )
    list_filter = ("status", "collection", "embedding_model")
    search_fields = ("title", "source")
    list_select_related = ("collection", "file")
    fields = (
        "title",
        "collection",
        "source",
        "status",
        "progress",
        "error",
        "chunk_count",
        "embedding_model",
        "timings",
        "started_at",
        "finished_at",
        "content_hash",
        "metadata",
        "content",
        "created_at",
        "updated_at",
    )
    readonly_fields = tuple(f for f in fields if f not in ("title", "metadata"))
    actions = ["reingest", "reembed", "delete_selected"]
    change_list_template = "admin/rag/document/change_list.html"

    class Media:
        js = ["rag/admin/document_status.js"]
        css = {"all": ["rag/admin/document_status.css"]}

    def get_queryset(self, request: HttpRequest) -> QuerySet[Document]:
        documents = super().get_queryset(request).filter(collection__in=readable(request).values("pk"))
        return documents.defer("content", "file__data")  # the list shows sizes, never the bytes

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path("status/", view(self.status_view), name="rag_document_status"),
            path("try-query/", view(self.try_query_view), name="rag_document_try_query"),
            path("<int:object_id>/chunks/", view(self.chunks_view), name="rag_document_chunks"),
            *super().get_urls(),
        ]

    # --- list cells (the poller updates the ones marked with data-document) ---

    @admin.display(description="status", ordering="status")
    def status_cell(self, obj: Document) -> str:
        return format_html(
            '<span class="rag-status rag-status-{}" data-document="{}" data-field="status">{}</span>'
            '<progress max="1" value="{}" data-document="{}" data-field="progress"{}></progress>'
            '<div class="rag-error" data-document="{}" data-field="error">{}</div>',
            obj.status,
            obj.pk,
            obj.get_status_display(),
            obj.progress,
            obj.pk,
            "" if obj.status not in Document.SETTLED else " hidden",
            obj.pk,
            obj.error,
        )

    @admin.display(description="chunks", ordering="chunk_count")
    def chunks_cell(self, obj: Document) -> str:
        url = reverse("admin:rag_document_chunks", args=[obj.pk])
        return format_html(
            '<a href="{}" data-document="{}" data-field="chunk_count">{}</a>', url, obj.pk, obj.chunk_count
        )

    @admin.display(description="embedding model", ordering="embedding_model")
    def model_cell(self, obj: Document) -> str:
        return format_html(
            '<span data-document="{}" data-field="embedding_model">{}</span>', obj.pk, obj.embedding_model
        )

    @admin.display(description="upload", ordering="file__size")
    def upload_cell(self, obj: Document) -> str:
        size = getattr(getattr(obj, "file", None), "size", None)
        return filesizeformat(size) if size is not None else "–"

    @admin.display(description="took")
    def took(self, obj: Document) -> str:
        total = obj.timings.get("total_ms")
        return f"{total / 1000:.1f} s" if total is not None else "–"

    # --- adding: an upload form instead of the model form ---

    def add_view(self, request: HttpRequest, form_url: str = "", extra_context=None) -> HttpResponse:
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = UploadForm(request.POST or None, request.FILES or None, collections=readable(request))
        if request.method == "POST" and form.is_valid():
            collection = form.cleaned_data["collection"]
            results = [
                ingestion.submit_upload(collection=collection, upload=upload) for upload in form.cleaned_data["files"]
            ]
            if form.cleaned_data["text"].strip():
                results.append(
                    ingestion.submit_text(
                        collection=collection, title=form.cleaned_data["title"], text=form.cleaned_data["text"]
                    )
                )
            for result in results:
                level = {"failed": messages.ERROR, "duplicate": messages.WARNING}.get(result.outcome, messages.SUCCESS)
                self.message_user(request, result.message, level)
            return HttpResponseRedirect(reverse("admin:rag_document_changelist"))
        context = {
            **self.admin_site.each_context(request),
            "title": "Add documents",
            "form": form,
            "opts": self.model._meta,
            "media": self.media + form.media,
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/rag/document/upload.html", context)

    def has_change_permission(self, request: HttpRequest, obj: Document | None = None) -> bool:
        return super().has_change_permission(request, obj) and (obj is None or self._can_read(request, obj))

    def has_delete_permission(self, request: HttpRequest, obj: Document | None = None) -> bool:
        return super().has_delete_permission(request, obj) and (obj is None or self._can_read(request, obj))

    def _can_read(self, request: HttpRequest, obj: Document) -> bool:
        return readable(request).filter(pk=obj.collection_id).exists()

    def changelist_view(self, request: HttpRequest, extra_context=None) -> HttpResponse:
        model = embedding_provider().model
        documents = self.get_queryset(request)
        done, total = ingestion.embedding_coverage(documents=documents, embedding_model=model)
        files, size = ingestion.upload_bytes(documents=documents)
        context = {
            "embedding_model": model,
            "embedded": done,
            "embeddable": total,
            "upload_files": files,
            "upload_size": size,
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context=context)

    # --- actions ---

    @admin.action(description="Re-ingest: parse, chunk and embed again (in the background)")
    def reingest(self, request: HttpRequest, queryset: QuerySet[Document]) -> None:
        count = ingestion.requeue(documents=queryset)
        self.message_user(request, f"{count} document(s) queued; the current chunks answer until each is done.")

    @admin.action(description="Re-chunk and re-embed the stored text with the current settings (in the background)")
    def reembed(self, request: HttpRequest, queryset: QuerySet[Document]) -> None:
        count = ingestion.requeue(documents=queryset, reembed=True)
        self.message_user(request, f"{count} document(s) queued for re-embedding with {embedding_provider().model}.")

    # --- extra views ---

    def status_view(self, request: HttpRequest) -> JsonResponse:
        """GET ?ids=1,2,3 → the live fields of those documents (staff only, like every admin view)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        try:
            ids = [int(i) for i in request.GET.get("ids", "").split(",") if i][:500]
        except ValueError:
            return JsonResponse({"error": "ids must be comma-separated numbers."}, status=400)
        rows = ingestion.status_of(documents=self.get_queryset(request).filter(pk__in=ids))
        for row in rows:
            row["status_display"] = Document.Status(row["status"]).label
        return JsonResponse({"documents": rows})

    def chunks_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        document = get_object_or_404(self.get_queryset(request), pk=object_id)
        if not self.has_view_permission(request, document):
            raise PermissionDenied
        chunks = Chunk.objects.filter(document=document).defer("embedding").order_by("embedding_model", "position")
        context = {
            **self.admin_site.each_context(request),
            "title": f"Chunks of “{document}”",
            "document": document,
            "chunks": chunks,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/rag/document/chunks.html", context)

    def try_query_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        collections = readable(request)
        form = TryQueryForm(request.POST or None, collections=collections)
        sources, error, ms = None, "", None
        if request.method == "POST" and form.is_valid():
            chosen = form.cleaned_data["collection"]
            scope = collections.filter(pk=chosen.pk) if chosen else collections
            try:
                search = retrieval.retrieve(
                    question=form.cleaned_data["question"],
                    k=form.cleaned_data["k"],
                    embedder=embedding_provider(),
                    collections=scope,
                    metadata=form.cleaned_data["filter"],
                )
                result = run_apart(search)
            except ProviderError as exc:
                error = exc.message
            else:
                sources, ms = result.sources, round(result.ms, 1)
        context = {
            **self.admin_site.each_context(request),
            "title": "Try a query",
            "form": form,
            "sources": sources,
            "error": error,
            "ms": ms,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/rag/document/try_query.html", context)


def run_apart(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` from a sync admin view on an event loop of its own, in a thread of its
    own, with HTTP clients of its own that close with that loop.

    Not ``async_to_sync``: under daphne that runs the coroutine on the server's own loop, and
    closing the clients afterwards broke every answer streaming at that moment (they share
    that loop's clients); not closing them would leak a client per request elsewhere."""
    with ThreadPoolExecutor(1, thread_name_prefix="admin-search") as thread:
        return thread.submit(asyncio.run, providers.closing(coroutine)).result()


class MessageInline(admin.TabularInline):
    model = Message
    fields = (
        "role",
        "status",
        "text",
        "model",
        "ttft_ms",
        "total_ms",
        "tokens",
        "tokens_per_s",
        "gap_p95_ms",
        "finish_reason",
    )
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(BaseAdmin):
    list_display = ("title", "user", "updated_at", "created_at")
    list_filter = ("updated_at",)
    search_fields = ("title",)
    inlines = [MessageInline]
    readonly_fields = ("user", "session_key", "title", "created_at", "updated_at")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Conversation]:
        # Whole conversations only: one that quotes a collection this user may not read is hidden.
        restricted = Message.objects.citing_unreadable(request.user).values("conversation_id")
        return super().get_queryset(request).exclude(pk__in=restricted)

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(Message)
class MessageAdmin(BaseAdmin):
    list_display = (
        "role",
        "status",
        "short_text",
        "model",
        "ttft_ms",
        "tokens_per_s",
        "gap_p95_ms",
        "total_ms",
        "tokens",
        "feedback_value",
        "created_at",
    )
    list_filter = ("status", "role", "model", "created_at", "feedback__value")
    list_select_related = ("feedback",)
    search_fields = ("text",)
    # Newest first, along the primary key's index: the model's own order (oldest first, by
    # created_at, which has no index) sorted every message for each page, 186 of the 540 ms
    # of the list at 360,000 messages.
    ordering = ("-id",)
    show_full_result_count = False  # a second COUNT(*) of every message on each search

    def get_queryset(self, request: HttpRequest) -> QuerySet[Message]:
        return super().get_queryset(request).citing_only_readable(request.user)

    @admin.display(description="text")
    def short_text(self, obj: Message) -> str:
        return obj.text[:80]

    @admin.display(description="feedback")
    def feedback_value(self, obj: Message) -> str:
        feedback = getattr(obj, "feedback", None)
        return feedback.value if feedback else ""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Feedback)
class FeedbackAdmin(BaseAdmin):
    list_display = ("value", "message", "chunk_ids", "updated_at")
    list_filter = ("value", "updated_at", "message__model")
    readonly_fields = ("message", "value", "chunk_ids", "created_at", "updated_at")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Feedback]:
        readable = Message.objects.citing_only_readable(request.user)
        return super().get_queryset(request).filter(message__in=readable.values("pk"))

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
