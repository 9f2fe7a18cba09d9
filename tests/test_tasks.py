"""rag.tasks under the real worker process, end to end: an admin upload becomes searchable with no extra step."""

from __future__ import annotations

import io
import json
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test import Client
from django.urls import reverse

from rag.models import Collection, Document
from tests.conftest import wait_until
from tests.fake_openai import FakeOpenAI
from tests.files import pdf_bytes
from tests.processes import Process, app_env, start
from tests.sse import SSEParser

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def worker(fake_server: FakeOpenAI) -> Iterator[Process]:
    """``manage.py db_worker`` as `make run` starts it, on the test database; its output goes
    to a file (a pipe nobody reads blocks the worker once it fills)."""
    env = app_env(connection.settings_dict["NAME"], fake_server.base_url)
    args = ["db_worker", "--no-reload", "--no-startup-delay", "--interval", "0.1", "--queue-name", "*"]
    proc = start("worker", [sys.executable, "manage.py", *args], env=env, port=0, ready=lambda: True)
    yield proc
    proc.stop()


def test_admin_upload_is_ingested_by_the_worker_and_answers_on_the_stream(worker, live_server_url):
    staff = User.objects.create_superuser("admin", password="pw")
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff)
    add = reverse("admin:rag_document_add")
    page = client.get(add).content.decode()
    token = page.split('name="csrfmiddlewaretoken" value="')[1].split('"')[0]
    collection = Collection.objects.get_or_create(name="default")[0]
    files = [
        SimpleUploadedFile("zebras.md", b"# Zebras\n\nZebras have black and white stripes."),
        SimpleUploadedFile("giraffes.pdf", pdf_bytes("Giraffes have long necks.")),
        SimpleUploadedFile("broken.pdf", b"%PDF-1.4 truncated"),
    ]
    response = client.post(add, {"csrfmiddlewaretoken": token, "collection": collection.pk, "files": files})
    assert response.status_code == 302

    def settled() -> bool:
        return not Document.objects.exclude(status__in=Document.SETTLED).exists()

    wait_until(settled, timeout=30, what="the worker to ingest the uploads")
    assert dict(Document.objects.values_list("source", "status")) == {
        "zebras.md": "ready",
        "giraffes.pdf": "ready",
        "broken.pdf": "failed",
    }
    assert "not a readable PDF" in Document.objects.get(source="broken.pdf").error

    query = urllib.parse.urlencode({"question": "What stripes do zebras have?", "k": 1})
    with urllib.request.urlopen(f"{live_server_url}/rag/stream?{query}", timeout=20) as resp:
        events = SSEParser().feed(resp.read())
    [sources] = [json.loads(e.data) for e in events if e.type == "sources"]
    assert [s["title"] for s in sources] == ["zebras"]
    assert events[-1].data == "[DONE]"


def test_a_document_that_keeps_stopping_the_worker_is_failed_after_three_runs(fake_server):
    """A worker killed mid-document (out of memory, say) used to find it queued again at
    every start, forever. Each run is counted; after three unfinished ones the document is
    failed with its reason, and the task rows the dead worker left "running" are failed too."""
    from django.core.management import call_command
    from django_tasks_db.models import DBTaskResult

    from rag.services import ingestion

    collection = Collection.objects.get_or_create(name="default")[0]
    # Its embedding request never returns: the worker is always mid-run when it is killed.
    poison = ingestion.submit_file(collection=collection, name="poison.md", data=b"Stops the worker. fault=embed_hang")
    for run in range(1, ingestion.MAX_ATTEMPTS + 1):
        if run > 1:
            call_command("requeue_interrupted", "--older-than", "0", stdout=io.StringIO())
        env = app_env(connection.settings_dict["NAME"], fake_server.base_url, RAG_TEST_LLM_TIMEOUT="120")
        args = ["db_worker", "--no-reload", "--no-startup-delay", "--interval", "0.1", "--queue-name", "*"]
        worker = start("worker", [sys.executable, "manage.py", *args], env=env, port=0, ready=lambda: True)

        def embedding(run: int = run) -> bool:
            document = Document.objects.get(pk=poison.document_id)
            return document.status in ("chunking", "embedding") and document.attempts == run

        wait_until(embedding, timeout=30, what=f"run {run} to be waiting on its embeddings")
        worker.proc.kill()  # SIGKILL: nothing of the run is cleaned up
        worker.proc.wait()

    out = io.StringIO()
    call_command("requeue_interrupted", "--older-than", "0", stdout=out)

    document = Document.objects.get(pk=poison.document_id)
    assert document.status == "failed" and "stopped 3 times" in document.error
    assert "Marked 1 document(s) failed" in out.getvalue()
    assert not DBTaskResult.objects.filter(status="RUNNING").exists()
    assert DBTaskResult.objects.filter(status="FAILED").count() == ingestion.MAX_ATTEMPTS
    assert not DBTaskResult.objects.filter(status="READY").exists()  # not queued a fourth time


def test_one_file_uploaded_twice_at_the_same_moment_becomes_one_document(fake_server):
    """Both submissions used to find no duplicate and make a document each; with two
    workers, the second then failed as a duplicate of the first."""
    import threading

    from rag.services import ingestion

    collection = Collection.objects.get_or_create(name="default")[0]
    data = b"# Okapis\n\nOkapis are related to giraffes."
    together = threading.Barrier(2)
    outcomes: list[str] = []

    def upload(name: str) -> None:
        try:
            together.wait()
            outcomes.append(ingestion.submit_file(collection=collection, name=name, data=data).outcome)
        finally:
            connection.close()

    threads = [threading.Thread(target=upload, args=(name,)) for name in ("okapis.md", "okapis (1).md")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    env = app_env(connection.settings_dict["NAME"], fake_server.base_url)
    args = ["db_worker", "--no-reload", "--no-startup-delay", "--interval", "0.1", "--queue-name", "*"]
    workers = [
        start(f"worker{i}", [sys.executable, "manage.py", *args], env=env, port=0, ready=lambda: True) for i in (1, 2)
    ]
    try:
        wait_until(
            lambda: not Document.objects.exclude(status__in=Document.SETTLED).exists(),
            timeout=30,
            what="the workers to settle every document",
        )
    finally:
        for worker in workers:
            worker.stop()

    assert sorted(outcomes) == ["duplicate", "queued"]
    assert list(Document.objects.values_list("status", flat=True)) == ["ready"]
