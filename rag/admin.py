from django.contrib import admin

from rag.models import Chunk, Conversation, Document, Message


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
    list_display = ("title", "user", "created_at")
    inlines = [MessageInline]
    readonly_fields = ("user", "session_key", "title", "created_at", "updated_at")


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("role", "status", "short_text", "model", "ttft_ms", "total_ms", "tokens", "created_at")
    list_filter = ("status", "role", "model", "created_at")

    @admin.display(description="text")
    def short_text(self, obj: Message) -> str:
        return obj.text[:80]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
