from django.urls import path

from rag.web.consumer import RagConsumer

websocket_urlpatterns = [path("ws/rag/", RagConsumer.as_asgi())]
