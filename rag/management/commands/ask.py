"""python manage.py ask "question" — stream an answer to the terminal."""

from __future__ import annotations

import sys
import time

from django.core.management.base import BaseCommand, CommandError, CommandParser

from rag import providers
from rag.forms import BadQuestion, parse_collection_name, parse_question
from rag.models import Collection, Reader
from rag.python_api import RAG
from rag.services import answering
from rag.services.metadata_filter import FilterError, MetadataFilter


class Command(BaseCommand):
    help = "Ask the knowledge base a question and stream the answer as it is generated."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("question", nargs="+", help="The question (quotes optional).")
        parser.add_argument("-k", type=int, default=None, help="How many chunks to retrieve.")
        parser.add_argument(
            "--collection", metavar="NAME", help="Search this collection only (by name); default: all of them."
        )
        parser.add_argument(
            "--filter",
            dest="metadata",
            metavar="JSON",
            help='Keep documents whose metadata match, as JSON: \'{"tags": "faq"}\'.',
        )
        parser.add_argument("--no-sources", action="store_true", help="Do not list the sources.")

    def handle(
        self,
        *args,
        question: list[str],
        k: int | None,
        collection: str | None,
        metadata: str | None,
        no_sources: bool,
        **options,
    ) -> None:
        try:
            q = parse_question(question=" ".join(question), k=k)
            name = parse_collection_name(collection)
            where = MetadataFilter.parse(metadata)
        except (BadQuestion, FilterError) as exc:
            raise CommandError(str(exc)) from None
        # The operator's tool: every collection, as the Python API searches, unless narrowed.
        scope = None
        if name is not None:
            if not Collection.objects.filter(name=name).exists():
                names = ", ".join(Collection.objects.values_list("name", flat=True)) or "none yet"
                raise CommandError(f"There is no collection named “{name}” (there are: {names}).")
            scope = Reader(superuser=True).only(name=name)
        asked = self._ask(q.question, q.k, collections=scope, metadata=where, show_sources=not no_sources)
        if not providers.run(asked):
            raise CommandError("The answer failed (see above).")

    async def _ask(
        self, question: str, k: int, *, collections: Reader | None, metadata: MetadataFilter | None, show_sources: bool
    ) -> bool:
        out = self.stdout
        started = time.perf_counter()
        first: float | None = None
        metrics: answering.Metrics | None = None
        ok = True
        async for event in RAG().aevents(question, k=k, collections=collections, metadata=metadata):
            match event:
                case answering.Sources(sources=sources) if show_sources:
                    for s in sources:
                        where = f"{s.title} > {s.heading}" if s.heading and s.heading != s.title else s.title
                        out.write(self.style.HTTP_INFO(f"[{s.n}] {where} ({s.score:.2f})"))
                    out.write("")
                case answering.Token(text=text):
                    if first is None:
                        first = time.perf_counter()
                    # Flushed per token: the point is to watch it arrive.
                    out.write(text, ending="")
                    out.flush()
                case answering.Metrics():
                    metrics = event
                case answering.Error(message=message):
                    ok = False
                    sys.stderr.write(self.style.ERROR(f"\nError: {message}") + "\n")
        total = time.perf_counter() - started
        ttft = f"{(first - started) * 1000:.0f} ms" if first else "n/a"
        out.write("")
        out.write(
            self.style.SUCCESS(f"\nTime to first token: {ttft} | Total: {total * 1000:.0f} ms | {_pace(metrics)}")
        )
        return ok


def _pace(metrics: answering.Metrics | None) -> str:
    """Tokens/s and inter-token gaps as the answer was measured and saved (n/a: an error, or under two tokens)."""
    rate = f"{metrics.tokens_per_s:.1f}" if metrics and metrics.tokens_per_s is not None else "n/a"
    gaps = "n/a"
    if metrics and metrics.gap_p50_ms is not None:
        gaps = f"{metrics.gap_p50_ms:.0f}/{metrics.gap_p95_ms:.0f}/{metrics.gap_max_ms:.0f} ms"
    return f"Tokens/s: {rate} | Gap p50/p95/max: {gaps}"
