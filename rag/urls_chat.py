from django.urls import path

from rag.web import chat

app_name = "chat"

urlpatterns = [
    path("", chat.page, name="page"),
    path("c/<uuid:conversation_id>", chat.page, name="conversation"),
    path("chat/ask", chat.ask, name="ask"),
    path("chat/answers/<int:answer_id>", chat.answer_detail, name="answer"),
    path("chat/answers/<int:answer_id>/stream", chat.answer_stream, name="stream"),
    path("chat/answers/<int:answer_id>/stop", chat.stop, name="stop"),
    path("chat/answers/<int:answer_id>/regenerate", chat.regenerate, name="regenerate"),
    path("chat/answers/<int:answer_id>/feedback", chat.feedback, name="feedback"),
    path("chat/documents/<int:document_id>", chat.document, name="document"),
]
