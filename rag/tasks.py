"""Background tasks (django-tasks, run by ``manage.py db_worker``): thin wrappers over services.

The worker runs each async task on an event loop of its own, so each task
closes the HTTP clients it opened before its loop ends (``providers.closing``).
"""

from __future__ import annotations

from django_tasks import task

from rag import providers
from rag.services import ingestion


@task()
async def ingest_document(document_id: int) -> str:
    return await providers.closing(ingestion.aingest(document_id=document_id))


@task()
async def reembed_document(document_id: int) -> str:
    return await providers.closing(ingestion.areembed(document_id=document_id))
