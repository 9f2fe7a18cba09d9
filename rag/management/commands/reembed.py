"""python manage.py reembed — chunk and embed every document's stored text again, with the
configured chunker and embedding model (after a change of either).

Chunks of the old model stay until ``--prune``, so search keeps answering
from them until the new ones are in. To switch models without a gap, run it
with the new model's settings while the app still runs with the old ones::

    RAG_EMBEDDING_MODEL=new-model python manage.py reembed --now
    # then restart the app with RAG_EMBEDDING_MODEL=new-model, and later:
    RAG_EMBEDDING_MODEL=new-model python manage.py reembed --prune
"""

from __future__ import annotations

import sys
import time

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from rag import providers
from rag.models import Collection, Document
from rag.providers import embedding_provider
from rag.services import ingestion


class Command(BaseCommand):
    help = (
        "Re-chunk and re-embed every document (or one collection's) with the configured chunking "
        "settings and embedding model; the admin shows each document's progress."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--collection", help="Only this collection.")
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--now", action="store_true", help="Embed in this process instead of the worker.")
        mode.add_argument("--wait", action="store_true", help="Queue, then show the worker's progress until done.")
        mode.add_argument("--prune", action="store_true", help="Delete chunks of other models (after re-embedding).")

    def handle(self, *args, collection: str | None, now: bool, wait: bool, prune: bool, **options) -> None:
        documents = Document.objects.all()
        if collection:
            if not Collection.objects.filter(name=collection).exists():
                raise CommandError(f"No collection named {collection!r}.")
            documents = documents.filter(collection__name=collection)
        model = embedding_provider().model
        if prune:
            done, total = ingestion.embedding_coverage(documents=documents, embedding_model=model)
            if done < total:
                raise CommandError(f"Only {done} of {total} documents have {model} chunks; re-embed them first.")
            self.stdout.write(
                f"Deleted {ingestion.prune_other_models(documents=documents, embedding_model=model)} chunks."
            )
            return
        if now:
            failed = providers.run(self._now(list(documents.values_list("pk", flat=True))))
            if failed:
                raise CommandError(f"{failed} document(s) failed; see their errors in the admin.")
            return
        count = ingestion.requeue(documents=documents, reembed=True)
        self.stdout.write(f"Queued {count} document(s) for re-embedding with {model}; the worker does the rest.")
        if wait:
            self._wait(documents, count)

    async def _now(self, ids: list[int]) -> int:
        failed = 0
        with tqdm(total=len(ids), unit="doc", file=sys.stderr, disable=None) as bar:
            for pk in ids:
                if await ingestion.areembed(document_id=pk) == Document.Status.FAILED:
                    failed += 1
                bar.update()
        return failed

    def _wait(self, documents, count: int) -> None:
        with tqdm(total=count, unit="doc", file=sys.stderr, disable=None) as bar:
            while True:
                busy = documents.exclude(status__in=Document.SETTLED).count()
                bar.n = count - busy
                bar.refresh()
                if not busy:
                    break
                time.sleep(1)  # polling the worker's progress, not timing a race
