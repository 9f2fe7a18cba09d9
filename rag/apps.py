import logging

from django.apps import AppConfig

logger = logging.getLogger("rag")


class RagConfig(AppConfig):
    name = "rag"
    verbose_name = "Knowledge base"

    def ready(self) -> None:
        from django.conf import settings
        from django.contrib.auth.signals import user_logged_in

        import rag.checks  # noqa: F401  (registers the local model's check)
        import ragsite.checks  # noqa: F401  (registers the middleware deploy checks)
        from rag.answers.access import adopt_on_login
        from rag.providers import ProviderError, chat_provider, embedding_provider

        user_logged_in.connect(adopt_on_login, dispatch_uid="rag.adopt_on_login")

        db = settings.DATABASES["default"]
        where = f"embedded Postgres in {settings.DATA_DIR / 'pgdata'}" if settings.EMBEDDED_DATABASE else db.get("HOST")
        try:
            chat, embedder = chat_provider().description, embedding_provider().description
        except ProviderError as exc:
            # Said at startup rather than on the first question.
            logger.error("Provider configuration: %s", exc.message)
            return
        logger.info("Chat: %s | Embeddings: %s | Database: %s (%s)", chat, embedder, where, db.get("NAME"))
