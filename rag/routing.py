from django.urls import path

from rag.consumers import RagConsumer

websocket_urlpatterns = [path("ws/rag/", RagConsumer.as_asgi())]
