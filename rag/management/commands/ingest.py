"""python manage.py ingest PATH... — add files, folders, globs or stdin to a collection."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from rag import providers
from rag.models import Collection, Document
from rag.providers import EmbeddingProvider, ProviderError, embedding_provider
from rag.services import parse_sandbox
from rag.services.documents import (
    DocumentInput,
    DuplicateDocumentError,
    EmptyDocumentError,
    aadd_document,
    aplan_document,
    bulk_load,
    default_collection,
)
from rag.services.parsing import SUFFIXES, ParseError

OUTCOMES = ("added", "unchanged", "replaced", "failed")


class Command(BaseCommand):
    help = (
        "Add files (txt, md, html, pdf, docx), folders of them, globs, or '-' for stdin to a collection. "
        "Re-runs are idempotent: unchanged files are skipped, changed ones replace their old version."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "paths", nargs="+", help="Files, folders (searched recursively), globs ('docs/**/*.md') or '-' for stdin."
        )
        parser.add_argument("--collection", default=Collection.DEFAULT_NAME, help="Collection name (default: default).")
        parser.add_argument("--title", default="", help="Title for text read from stdin.")
        parser.add_argument(
            "--meta",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="Metadata for every document, repeatable: --meta team=docs --meta year=2024 "
            '--meta \'tags=["faq", "howto"]\' (a value that is JSON is read as JSON, otherwise as text). '
            "Each file also gets source_type (its suffix) and path.",
        )
        parser.add_argument("--dry-run", action="store_true", help="Parse and report what would change; store nothing.")
        parser.add_argument(
            "--if-empty", action="store_true", help="Do nothing if the collection already has documents."
        )
        parser.add_argument(
            "--create", action="store_true", help="Create the collection if there is none of that name (staff only)."
        )
        parser.add_argument(
            "--public", action="store_true", help="With --create: everyone may read it, signed in or not."
        )

    def handle(
        self,
        *args,
        paths: list[str],
        collection: str,
        title: str,
        meta: list[str],
        dry_run: bool,
        if_empty: bool,
        create: bool,
        public: bool,
        **options,
    ) -> None:
        verbose = options.get("verbosity", 1) > 1
        metadata = parse_meta(meta)
        if public and not create:
            raise CommandError("--public only applies with --create, to a collection this command creates.")
        target = Collection.objects.filter(name=collection).first()
        if target is None and collection == Collection.DEFAULT_NAME:
            target = default_collection()
        elif target is None and not create:
            # A typo must not make a new collection, let alone a public one.
            names = ", ".join(sorted(Collection.objects.values_list("name", flat=True))) or "none yet"
            raise CommandError(
                f"There is no collection named “{collection}” (there are: {names}). "
                "Add --create to create it (staff only; --public to let everyone read it)."
            )
        elif target is None and not dry_run:
            visibility = Collection.Visibility.PUBLIC if public else Collection.Visibility.STAFF
            target = Collection.objects.create(name=collection, visibility=visibility)
            who = "everyone may read it" if public else "staff only; open it to groups or everyone in the admin"
            self.stdout.write(f"Created the collection “{collection}” ({who}).")
        if if_empty and target is not None and Document.objects.filter(collection=target).exists():
            self.stdout.write("The knowledge base has documents already; nothing to do.")
            return
        sources = list(self._collect(paths))
        if not sources:
            raise CommandError(f"No text files found in {', '.join(paths)} (looked for {', '.join(sorted(SUFFIXES))}).")
        results = providers.run(
            self._ingest(sources, title=title, metadata=metadata, collection=target, dry_run=dry_run)
        )
        counts = {outcome: sum(1 for o, _, _ in results if o == outcome) for outcome in OUTCOMES}
        summary = ", ".join(f"{outcome} {counts[outcome]}" for outcome in OUTCOMES).capitalize()
        self.stdout.write(self.style.SUCCESS(("Dry run: " if dry_run else "") + summary + "."))
        for outcome, source, reason in results:
            if outcome == "failed":
                self.stderr.write(f"  failed: {source}: {reason}")
            elif dry_run or verbose:
                self.stdout.write(f"  {outcome}: {source}")
        if counts["failed"]:
            raise CommandError(f"{counts['failed']} document(s) failed.")

    def _collect(self, paths: list[str]) -> Iterator[str]:
        """Every file to read, in order, once; '-' for stdin."""
        seen: set[str] = set()
        for raw in paths:
            if raw == "-":
                found = ["-"]
            elif Path(raw).is_dir():
                found = sorted(str(p) for p in Path(raw).rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
            elif Path(raw).exists():
                found = [raw]  # named explicitly: an unsupported type is reported, not skipped
            elif glob.has_magic(raw):
                found = sorted(p for p in glob.glob(raw, recursive=True) if Path(p).is_file())
                if not found:
                    raise CommandError(f"{raw} matches no files.")
            else:
                raise CommandError(f"{raw} does not exist.")
            for item in found:
                if item not in seen:
                    seen.add(item)
                    yield item

    async def _ingest(
        self, sources: list[str], *, title: str, metadata: dict, collection: Collection | None, dry_run: bool
    ) -> list[tuple[str, str, str]]:
        embedder = None if dry_run else embedding_provider()
        results: list[tuple[str, str, str]] = []
        # A first import into a model builds its search index once, at the end, and the
        # full-text statistics are taken once all documents are in (a dry run stores nothing).
        async with contextlib.nullcontext() if dry_run else bulk_load():
            with tqdm(total=len(sources), unit="doc", file=sys.stderr, disable=None) as bar:
                for source in sources:
                    bar.set_postfix_str(source[-40:])
                    results.append(
                        await self._one(
                            source, title=title, metadata=metadata, collection=collection, embedder=embedder
                        )
                    )
                    bar.update()
        return results

    async def _one(
        self,
        source: str,
        *,
        title: str,
        metadata: dict,
        collection: Collection | None,
        embedder: EmbeddingProvider | None,
    ) -> tuple[str, str, str]:
        """(outcome, source, reason) for one file; no embedder means a dry run."""
        try:
            doc = await asyncio.to_thread(_read, source, title, metadata)
            if embedder is None:
                outcome = await aplan_document(document=doc, collection=collection) if collection else "added"
            else:
                outcome = (await aadd_document(document=doc, embedder=embedder, collection=collection)).outcome
        except (ParseError, ProviderError) as exc:
            return ("failed", source, exc.message)
        except (EmptyDocumentError, DuplicateDocumentError) as exc:
            return ("failed", source, str(exc))
        return (outcome, "stdin" if source == "-" else source, "")


def parse_meta(pairs: list[str]) -> dict:
    """--meta KEY=VALUE options as a dict: a value that parses as JSON is taken as JSON
    (numbers, true, lists), anything else as text."""
    metadata: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"--meta takes KEY=VALUE, not {pair!r}.")
        try:
            metadata[key.strip()] = json.loads(value)
        except ValueError:
            metadata[key.strip()] = value
    return metadata


def _read(source: str, title: str, metadata: dict) -> DocumentInput:
    if source == "-":
        return DocumentInput(text=sys.stdin.read(), title=title, source="stdin", metadata=metadata)
    parsed = parse_sandbox.parse(name=source, data=Path(source).read_bytes())  # limits, as in the worker
    found = {"source_type": Path(source).suffix.lower().lstrip("."), "path": source}
    return DocumentInput(text=parsed.text, title=parsed.title, source=source, metadata=found | metadata)
