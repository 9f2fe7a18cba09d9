"""Background tasks (django-tasks, run by ``manage.py db_worker``): thin wrappers over services."""

from __future__ import annotations

from django_tasks import task

from rag.services import ingestion


@task()
async def ingest_document(document_id: int) -> str:
    return await ingestion.aingest(document_id=document_id)


@task()
async def reembed_document(document_id: int) -> str:
    return await ingestion.areembed(document_id=document_id)
