"""python manage.py ingest PATH... — add files, folders or stdin to the knowledge base."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from rag.models import Document
from rag.providers import ProviderError, embedding_provider
from rag.services.documents import AddResult, DocumentInput, EmptyDocumentError, aadd_document

TEXT_SUFFIXES = {".md", ".markdown", ".txt", ".rst", ".text"}


class Command(BaseCommand):
    help = "Add text and Markdown files (or folders of them, or '-' for stdin) to the knowledge base."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("paths", nargs="+", help="Files, folders (searched recursively) or '-' for stdin.")
        parser.add_argument("--title", default="", help="Title for text read from stdin.")
        parser.add_argument(
            "--if-empty", action="store_true", help="Do nothing if the knowledge base already has documents."
        )

    def handle(self, *args, paths: list[str], title: str, if_empty: bool, **options) -> None:
        if if_empty and Document.objects.exists():
            self.stdout.write("The knowledge base has documents already; nothing to do.")
            return
        inputs = list(self._collect(paths, title))
        if not inputs:
            raise CommandError(
                f"No text files found in {', '.join(paths)} (looked for {', '.join(sorted(TEXT_SUFFIXES))})."
            )
        added, unchanged, failed = asyncio.run(self._ingest(inputs))
        self.stdout.write(self.style.SUCCESS(f"Added {len(added)}, unchanged {len(unchanged)}, failed {len(failed)}."))
        for source, reason in failed:
            self.stderr.write(f"  failed: {source}: {reason}")
        if failed:
            raise CommandError(f"{len(failed)} document(s) failed.")

    def _collect(self, paths: list[str], title: str):
        for raw in paths:
            if raw == "-":
                yield DocumentInput(text=sys.stdin.read(), title=title, source="stdin")
                continue
            path = Path(raw)
            if not path.exists():
                raise CommandError(f"{raw} does not exist.")
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES) if path.is_dir() else [path]
            for file in files:
                try:
                    text = file.read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    raise CommandError(f"{file} is not UTF-8 text.") from None
                yield DocumentInput(text=text, source=str(file))

    async def _ingest(self, inputs: list[DocumentInput]):
        embedder = embedding_provider()
        added: list[AddResult] = []
        unchanged: list[AddResult] = []
        failed: list[tuple[str, str]] = []
        with tqdm(total=len(inputs), unit="doc", file=sys.stderr, disable=None) as bar:
            for doc in inputs:
                bar.set_postfix_str(doc.source[-40:])
                try:
                    result = await aadd_document(document=doc, embedder=embedder)
                except (EmptyDocumentError, ProviderError) as exc:
                    failed.append((doc.source, str(exc)))
                else:
                    (added if result.created else unchanged).append(result)
                bar.update()
        return added, unchanged, failed
