"""The admin's document list in real headless Chromium: statuses change without a reload."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from playwright.async_api import Browser, Page

from rag.models import Collection, Document
from rag.services import ingestion
from tests.browser.conftest import CSP_RECORDER, csp_violations
from tests.files import encrypted_pdf_bytes

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT_MS = 15_000


@pytest.fixture
async def admin_page(browser: Browser, live_server_url: str) -> AsyncIterator[Page]:
    await sync_to_async(User.objects.create_superuser)("root", "root@example.com", "pw")
    context = await browser.new_context(base_url=live_server_url)
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    await page.add_init_script(CSP_RECORDER)
    await page.goto("/admin/login/?next=/admin/rag/document/")
    await page.fill("#id_username", "root")
    await page.fill("#id_password", "pw")
    await page.click("input[type=submit]")
    await page.wait_for_url("**/admin/rag/document/")
    yield page
    await context.close()


@sync_to_async
def submit_two() -> tuple[int, int]:
    collection = Collection.objects.create(name="kb")
    good = ingestion.submit_text(collection=collection, title="Bananas", text="Bananas are yellow fruit.")
    bad = ingestion.submit_file(collection=collection, name="locked.pdf", data=encrypted_pdf_bytes())
    return good.document_id, bad.document_id


async def test_the_list_follows_documents_from_queued_to_ready_or_failed_without_a_reload(admin_page, fake_llm):
    good, bad = await submit_two()
    page = admin_page
    await page.reload()
    status = f'[data-document="{good}"][data-field="status"]'
    assert await page.text_content(status) == "Queued"
    assert await page.is_visible(f'progress[data-document="{good}"]')
    await page.evaluate("window.__not_reloaded = true")  # gone if the page loads again
    navigations = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))

    # What the worker does with each task (db_worker itself wants the main thread for its signals).
    for document_id in (good, bad):
        await ingestion.aingest(document_id=document_id)

    await page.wait_for_selector(f"{status}.rag-status-ready")
    await page.wait_for_selector(f'[data-document="{bad}"][data-field="status"].rag-status-failed')
    assert navigations == [], navigations
    assert await page.evaluate("window.__not_reloaded === true")
    assert await page.text_content(status) == "Ready"
    chunks = (await sync_to_async(Document.objects.get)(pk=good)).chunk_count
    assert chunks > 0 and await page.text_content(f'[data-document="{good}"][data-field="chunk_count"]') == str(chunks)
    assert await page.is_hidden(f'progress[data-document="{good}"]')
    error = await page.text_content(f'[data-document="{bad}"][data-field="error"]')
    assert "password" in error.lower()


async def test_the_admins_upload_and_try_a_query_pages_run_under_the_csp_without_a_violation(admin_page, fake_llm):
    page = admin_page
    await sync_to_async(ingestion.submit_text)(
        collection=await sync_to_async(lambda: Collection.objects.create(name="kb"))(),
        title="Bananas",
        text="Bananas are yellow fruit.",
    )
    for document in [d async for d in Document.objects.all()]:
        await ingestion.aingest(document_id=document.pk)
    response = await page.goto("/admin/rag/document/add/")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert await csp_violations(page) == []
    await page.goto("/admin/rag/document/try-query/")
    await page.fill("#id_question", "yellow fruit")
    await page.click("input[type=submit]")
    await page.wait_for_selector("text=Bananas are yellow fruit.")
    assert await csp_violations(page) == []
    await page.goto("/admin/rag/document/")
    assert await csp_violations(page) == []
