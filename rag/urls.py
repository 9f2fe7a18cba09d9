from django.urls import path

from rag.web import api

app_name = "rag"

urlpatterns = [
    path("stream", api.stream, name="stream"),
    path("query", api.query, name="query"),
    path("answers/<str:key>/stop", api.stop, name="stop"),
]
