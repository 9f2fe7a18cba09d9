from django.contrib import admin
from django.urls import include, path

from rag.web.api import healthz

urlpatterns = [
    path("admin/", admin.site.urls),
    path("rag/", include("rag.urls")),
    path("healthz", healthz, name="healthz"),
    path("", include("rag.urls_chat")),
]
