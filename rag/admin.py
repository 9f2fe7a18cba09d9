from django.contrib import admin

from rag.models import Chunk, Conversation, Document, Feedback, Message


class ChunkInline(admin.TabularInline):
    model = Chunk
    fields = ("position", "heading", "token_count", "embedding_model", "text")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    list_display = ("title", "source", "chunk_count", "created_at")
    search_fields = ("title", "source")
    readonly_fields = ("content_hash", "created_at", "updated_at")
    inlines = [ChunkInline]

    @admin.display(description="chunks")
    def chunk_count(self, obj: Document) -> int:
        return obj.chunks.count()


class MessageInline(admin.TabularInline):
    model = Message
    fields = ("role", "status", "text", "model", "ttft_ms", "total_ms", "tokens", "finish_reason")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("title", "user", "updated_at", "created_at")
    list_filter = ("updated_at",)
    search_fields = ("title",)
    inlines = [MessageInline]
    readonly_fields = ("user", "session_key", "title", "created_at", "updated_at")

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = (
        "role",
        "status",
        "short_text",
        "model",
        "ttft_ms",
        "tokens_per_second",
        "total_ms",
        "tokens",
        "feedback_value",
        "created_at",
    )
    list_filter = ("status", "role", "model", "created_at", "feedback__value")
    list_select_related = ("feedback",)
    search_fields = ("text",)

    @admin.display(description="text")
    def short_text(self, obj: Message) -> str:
        return obj.text[:80]

    @admin.display(description="tokens/s")
    def tokens_per_second(self, obj: Message) -> float | None:
        return obj.tokens_per_second

    @admin.display(description="feedback")
    def feedback_value(self, obj: Message) -> str:
        feedback = getattr(obj, "feedback", None)
        return feedback.value if feedback else ""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Feedback)
class FeedbackAdmin(admin.ModelAdmin):
    list_display = ("value", "message", "chunk_ids", "updated_at")
    list_filter = ("value", "updated_at", "message__model")
    readonly_fields = ("message", "value", "chunk_ids", "created_at", "updated_at")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
