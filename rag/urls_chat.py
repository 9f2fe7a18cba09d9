from django.urls import path

from rag import views_chat

app_name = "chat"

urlpatterns = [
    path("", views_chat.page, name="page"),
    path("c/<uuid:conversation_id>", views_chat.page, name="conversation"),
    path("chat/ask", views_chat.ask, name="ask"),
    path("chat/answers/<int:answer_id>", views_chat.answer_detail, name="answer"),
    path("chat/answers/<int:answer_id>/stream", views_chat.answer_stream, name="stream"),
    path("chat/answers/<int:answer_id>/stop", views_chat.stop, name="stop"),
    path("chat/answers/<int:answer_id>/regenerate", views_chat.regenerate, name="regenerate"),
    path("chat/answers/<int:answer_id>/feedback", views_chat.feedback, name="feedback"),
    path("chat/documents/<int:document_id>", views_chat.document, name="document"),
]
