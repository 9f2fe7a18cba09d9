"""python manage.py prune_answer_logs — delete the event logs of answers that ended long ago."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from rag.answers import store


class Command(BaseCommand):
    help = (
        "Delete the event logs of answers that ended more than --days ago. Their text, sources "
        "and metrics stay on the answers. Run it daily, as Django's clearsessions."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        days = settings.RAG_ANSWER_LOG_DAYS
        parser.add_argument(
            "--days",
            type=float,
            default=days,
            help=f"Keep the logs of answers that ended within this many days (RAG_ANSWER_LOG_DAYS: {days:g}).",
        )

    def handle(self, *args, days: float, **options) -> None:
        if days < 0:
            raise CommandError("--days must be 0 or more.")
        before = timezone.now() - timedelta(days=days)
        deleted = store.prune_logs(ended_before=before)
        self.stdout.write(
            f"Deleted {deleted} event log run(s) of answers that ended before {before:%Y-%m-%d %H:%M} UTC."
        )
