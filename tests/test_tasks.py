"""rag.tasks under the real worker process, end to end: an admin upload becomes searchable with no extra step."""

from __future__ import annotations

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
