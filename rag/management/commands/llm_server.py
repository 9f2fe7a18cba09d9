"""python manage.py llm_server — serve the local chat model from a process of its own."""

from __future__ import annotations

import signal
import threading

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from rag.providers import ProviderError
from rag.providers.llama_server import ServerConfig, serve


class Command(BaseCommand):
    help = (
        "Serve the local GGUF chat model over an OpenAI-compatible API at RAG_LOCAL_LLM_URL, "
        "and start it again whenever it dies. make run and docker-compose run it; the web "
        "processes and workers reach it by URL."
    )
    requires_system_checks = []  # the model's own check (check --deploy --tag local_model) takes a while

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", help="Interface to listen on (default: RAG_LOCAL_LLM_URL's host).")
        parser.add_argument("--port", type=int, help="Port to listen on (default: RAG_LOCAL_LLM_URL's port).")

    def handle(self, *args, host: str | None, port: int | None, **options) -> None:
        if settings.RAG_CHAT_PROVIDER != "local":
            self.stdout.write(f"RAG_CHAT_PROVIDER is {settings.RAG_CHAT_PROVIDER!r}: there is no local model to serve.")
            return
        try:
            config = ServerConfig.from_settings(host=host, port=port)
        except ProviderError as exc:
            raise CommandError(exc.message) from None
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        self.stdout.write(f"Serving {config.gguf.name} at {config.url} (restarted if it dies; Ctrl+C to stop)")
        serve(config, stop=stop)
