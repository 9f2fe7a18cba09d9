from django.urls import path

from rag import views

app_name = "rag"

urlpatterns = [
    path("stream", views.stream, name="stream"),
    path("query", views.query, name="query"),
]
