"""Running the real task worker (django-tasks-db's db_worker) over the queue, in the test process."""

from __future__ import annotations

import io

from django.core.management import call_command
from django_tasks_db.models import DBTaskResult


def run_worker() -> int:
    """Process every queued task with the real worker, then return how many tasks it ran."""
    before = DBTaskResult.objects.exclude(status="READY").count()
    args = ["--batch", "--no-startup-delay", "--no-reload", "--queue-name", "*"]
    call_command("db_worker", *args, verbosity=0, stdout=io.StringIO())
    assert not DBTaskResult.objects.filter(status="READY").exists(), "the worker left tasks in the queue"
    return DBTaskResult.objects.exclude(status="READY").count() - before


def pending_tasks() -> int:
    return DBTaskResult.objects.filter(status="READY").count()
