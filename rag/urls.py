from django.urls import path

from rag import views

app_name = "rag"

urlpatterns = [
    path("stream", views.stream, name="stream"),
    path("query", views.query, name="query"),
    path("answers/<str:key>/stop", views.stop, name="stop"),
]
