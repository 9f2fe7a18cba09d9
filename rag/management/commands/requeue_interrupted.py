"""python manage.py requeue_interrupted — queue again documents a dead worker left half-done."""

from __future__ import annotations

from datetime import timedelta

from django.core.management.base import BaseCommand, CommandParser

from rag.services import ingestion


class Command(BaseCommand):
    help = (
        "Queue again the documents a worker stopped in the middle of (killed or restarted mid-run). "
        "Run it before starting the only worker with --older-than 0; with other workers running, "
        "keep the default so that their runs in progress are left alone."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        default = int(ingestion.STALE_AFTER.total_seconds())
        parser.add_argument(
            "--older-than",
            type=int,
            default=default,
            metavar="SECONDS",
            help=f"Only runs that have not moved for this long (default: {default}).",
        )

    def handle(self, *args, older_than: int, **options) -> None:
        count, given_up = ingestion.requeue_interrupted(stale_after=timedelta(seconds=max(older_than, 0)))
        if count or options.get("verbosity", 1) > 1:
            self.stdout.write(f"Queued {count} interrupted document(s) again.")
        if given_up:
            self.stdout.write(
                f"Marked {given_up} document(s) failed: the worker stopped {ingestion.MAX_ATTEMPTS} times "
                "while processing each (see their error in the admin)."
            )
