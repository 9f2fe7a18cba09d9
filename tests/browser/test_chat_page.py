"""The chat page in real headless Chromium (Debian's ``chromium``) against the app under daphne.

The app streams from the fake OpenAI server, whose pacing (first_token_ms, inter_token_ms) makes
streaming observable. A MutationObserver installed before any page script records, in the page,
the order in which sources and tokens appeared and every length the answer text had, so the
assertions do not depend on when Python happens to look.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page

from rag.models import Message
from tests.browser.conftest import CSP_RECORDER, csp_violations, wait_for_js
from tests.factories import CORPUS, add_corpus

pytestmark = pytest.mark.django_db(transaction=True)

RESULTS = Path(__file__).resolve().parents[2] / "test-results"
TIMEOUT_MS = 15_000

OBSERVER = """
window.__seen = {order: [], lengths: []};
new MutationObserver(() => {
  const seen = window.__seen;
  const answer = document.querySelector('.answer');
  if (!answer) return;
  if (answer.querySelector('.sources li') && !seen.order.includes('sources')) seen.order.push('sources');
  const text = answer.querySelector('.answer-text.streaming');
  if (text && text.textContent.length) {
    if (!seen.order.includes('token')) seen.order.push('token');
    const n = text.textContent.length;
    if (n !== seen.lengths[seen.lengths.length - 1]) seen.lengths.push(n);
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture
async def page(browser: Browser, live_server_url: str) -> AsyncIterator[Page]:
    context = await browser.new_context(base_url=live_server_url, viewport={"width": 1100, "height": 800})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    await page.add_init_script(OBSERVER)
    await page.add_init_script(CSP_RECORDER)
    page.dialogs = []  # any alert() an injected script managed to run
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), asyncio.ensure_future(dialog.dismiss())))
    yield page
    await context.close()


async def ask(page: Page, question: str) -> None:
    await page.goto("/")
    await page.fill("#question", question)
    await page.press("#question", "Enter")


async def test_a_question_streams_progressively_with_sources_first_then_markdown(page, fake_llm):
    await add_corpus()
    fake_llm.first_token_ms = 300
    fake_llm.inter_token_ms = 40
    words = [" vector", " similarity", " search", " to", " Postgres", " with", " HNSW", " indexes", " [1]."]
    fake_llm.tokens = ["**pgvector**", " adds", *words, "\n\n", "- exact search\n", "- `approximate` search"]

    await ask(page, "What does pgvector add to Postgres?")

    await wait_for_js(page, "window.__seen.lengths.length >= 6")  # seen growing, still streaming
    # The reader folds the sources while the answer streams: they stay as they are when it ends.
    still_streaming = await page.evaluate(
        """() => { const panel = document.querySelector('.sources-panel');
                   panel.open = false; panel.dataset.folded = 'by the reader';
                   return document.querySelector('.answer-text.streaming') !== null; }"""
    )
    assert still_streaming
    await page.wait_for_selector(".answer .markdown strong")  # done: rendered Markdown replaced the text
    assert await page.evaluate("document.querySelector('.sources-panel').dataset.folded") == "by the reader"
    assert await page.evaluate("document.querySelector('.sources-panel').open") is False
    seen = await page.evaluate("window.__seen")
    assert seen["order"] == ["sources", "token"]
    assert seen["lengths"] == sorted(seen["lengths"]) and len(seen["lengths"]) >= 6
    assert await page.locator(".answer-text.streaming").count() == 0
    assert await page.text_content(".answer .markdown strong") == "pgvector"
    assert await page.locator(".answer .markdown li").count() == 2
    assert await page.locator(".answer .markdown code").text_content() == "approximate"
    cite = page.locator(".answer .markdown a.cite")
    assert await cite.text_content() == "[1]"
    assert (await cite.get_attribute("href")).endswith("-1")
    assert await page.locator(".sources-panel li").count() == 4
    assert "first token" in await page.text_content(".answer .metrics")
    assert "fake-chat" in await page.text_content(".answer .metrics")
    # The new conversation is in the sidebar and in the address bar.
    assert "/c/" in page.url
    assert await page.locator("#conversations a[aria-current=page]").text_content() == (
        "What does pgvector add to Postgres?"
    )
    RESULTS.mkdir(exist_ok=True)
    await page.screenshot(path=RESULTS / "chat-page.png", full_page=True)
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.screenshot(path=RESULTS / "chat-page-phone.png", full_page=True)

    # A follow-up in the same conversation, and the back button returns to the start page.
    fake_llm.first_token_ms = 0
    fake_llm.inter_token_ms = 0
    fake_llm.tokens = ["HNSW", " and", " IVFFlat", " [1]"]
    await page.fill("#question", "Which indexes?")
    await page.press("#question", "Enter")
    await wait_for_js(page, "document.querySelectorAll('.answer .markdown').length === 2")
    assert await page.locator(".turn").count() == 2
    conversation_url = page.url
    await page.goto("/")
    await page.go_back()
    assert page.url == conversation_url
    assert await page.locator(".turn").count() == 2


async def test_stop_stops_the_model_and_keeps_the_partial_answer(page, fake_llm):
    await add_corpus()
    fake_llm.tokens = [f"word{i} " for i in range(300)]
    fake_llm.inter_token_ms = 30

    await ask(page, "Tell me everything about bananas")
    await wait_for_js(page, "window.__seen.lengths.length >= 3")
    await page.click("button.stop")

    record = await asyncio.to_thread(fake_llm.wait_for_close, timeout=10)
    assert record.closed_by_client and record.tokens_sent < 300
    await page.wait_for_selector(".answer.answer-stopped")
    assert "stopped" in await page.text_content(".answer .metrics")
    answer = await Message.objects.filter(role="assistant").alatest("id")
    assert answer.status == Message.Status.STOPPED and answer.text.startswith("word0 word1 word2")
    assert (await page.text_content(".answer .markdown")).strip() == answer.text.strip()


async def test_script_in_a_document_a_question_or_an_answer_never_runs(page, fake_llm):
    payload = '<img src=x onerror="window.__xss=1;alert(1)"><script>window.__xss=2;alert(2)</script>'
    await add_corpus({**CORPUS, f"Evil {payload}": f"Bananas and evil markup {payload} in a document."})
    evil_token = '<img src=x onerror="window.__xss=3;alert(3)">'
    fake_llm.tokens = ["Bananas ", evil_token, " and ", "<script>alert(4)</script>"]

    await ask(page, f"Bananas? {payload}")
    await page.wait_for_selector(".answer .markdown")

    assert await page.evaluate("window.__xss") is None
    assert page.dialogs == []
    assert await page.locator(".thread img, .thread script").count() == 0
    thread = await page.text_content("#thread")
    assert payload in thread  # the question and the source title, as text
    assert '<img src=x onerror="window.__xss=3;alert(3)">' in thread
    assert "<script>alert(4)</script>" in thread
    # Reloaded from the server, it is still text.
    await page.reload()
    await page.wait_for_selector(".answer .markdown")
    assert await page.evaluate("window.__xss") is None and page.dialogs == []
    assert await page.locator(".thread img, .thread script").count() == 0


async def test_static_files_are_served_and_the_page_is_labelled(page, live_server_url):
    await page.goto("/")
    assert await page.evaluate("typeof htmx") == "object"
    assert await page.evaluate("htmx.version") == "2.0.11"
    assert await page.get_attribute("#question", "id") == "question"
    assert await page.locator("label[for=question]").count() == 1
    assert await page.locator("nav[aria-label=Conversations]").count() == 1


async def test_a_reload_mid_answer_shows_it_catching_up_then_finishing(page, fake_llm):
    """The answer belongs to no tab: a reload replays what was written and follows the rest live."""
    await add_corpus()
    fake_llm.inter_token_ms = 60
    fake_llm.tokens = [f"word{i} " for i in range(40)]

    await ask(page, "What does pgvector add to Postgres?")
    await wait_for_js(page, "window.__seen.lengths.length >= 5")  # a few tokens in
    await page.reload()  # the EventSource goes with the old page; the answer does not

    # The reloaded page subscribes to the same answer: it catches up, then grows live.
    await wait_for_js(page, "window.__seen.lengths.length >= 3")
    await page.wait_for_selector(".answer .markdown")  # done
    seen = await page.evaluate("window.__seen")
    assert seen["lengths"] == sorted(seen["lengths"])
    assert "".join(fake_llm.tokens).strip() in await page.text_content(".answer .markdown")
    [request] = [r for r in fake_llm.records if r.stream]  # generated once, not again on reload
    assert not request.closed_by_client
    answer = await Message.objects.filter(role=Message.Role.ASSISTANT).alatest("pk")
    assert answer.status == Message.Status.COMPLETE


async def test_the_chat_page_and_a_conversation_run_under_the_csp_without_a_violation(page, fake_llm):
    await add_corpus()
    fake_llm.tokens = ["**pgvector**", " adds", " vectors", " [1]"]
    await ask(page, "What does pgvector add to Postgres?")
    await page.wait_for_selector(".answer .markdown strong")  # streamed, then rendered
    response = await page.reload()  # the conversation's own page, /c/<id>
    assert "/c/" in page.url
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    await page.wait_for_selector(".answer .markdown strong")
    assert await csp_violations(page) == []


async def test_a_question_asked_while_the_database_is_down_stays_in_the_box_with_the_reason(
    page, fake_llm, database_down
):
    await add_corpus()
    await page.goto("/")
    await database_down.refuse()
    await page.fill("#question", "What does pgvector add?")

    async with page.expect_response("**/chat/ask") as response:
        await page.press("#question", "Enter")
    assert (await response.value).status == 503
    assert "database cannot be reached" in await page.text_content("#form-error")
    assert await page.input_value("#question") == "What does pgvector add?"

    await database_down.allow()
    await page.press("#question", "Enter")  # the same question, sent again
    await page.wait_for_selector(".answer .markdown")
    assert await page.text_content("#form-error") == ""
    assert await Message.objects.filter(role=Message.Role.USER, text="What does pgvector add?").acount() == 1


async def test_a_question_the_server_cannot_be_reached_for_stays_in_the_box_with_the_reason(page, live_server_url):
    await page.goto("/")
    await page.route("**/chat/ask", lambda route: route.abort("connectionrefused"))
    await page.fill("#question", "What does pgvector add?")
    await page.press("#question", "Enter")
    await wait_for_js(page, "document.querySelector('#form-error').textContent.length > 0")
    assert "could not be reached" in await page.text_content("#form-error")
    assert await page.input_value("#question") == "What does pgvector add?"


async def test_a_stream_the_browser_gave_up_on_resumes_where_the_page_is_not_from_the_start(page, fake_llm):
    """The browser's reconnect is refused (a 503, as while Postgres restarts): the EventSource is
    closed for good, and htmx's SSE extension opens a new one, which sends no Last-Event-ID."""
    await add_corpus()
    fake_llm.tokens = [f"word{i} " for i in range(12)]
    whole = "".join(fake_llm.tokens)
    streams, last_sent = [], []

    async def stream(route):
        streams.append(route.request)
        if len(streams) == 1:  # the first 4 tokens, then the connection ends
            response = await route.fetch()
            frames = (await response.text()).split("\n\n")
            tokens = [n for n, frame in enumerate(frames) if "\nevent: token\n" in f"\n{frame}\n"]
            sent = frames[: tokens[3] + 1]
            last_sent.append(re.search(r"^id: (\S+)$", sent[-1], re.M).group(1))
            await route.fulfill(response=response, body="\n\n".join(sent) + "\n\n")
        elif len(streams) == 2:  # the browser's reconnect, with its Last-Event-ID: refused
            await route.fulfill(status=503, body="down")
        else:
            await route.continue_()

    await page.route("**/chat/answers/*/stream*", stream)
    await ask(page, "What does pgvector add?")
    await page.wait_for_selector(".answer .markdown")

    assert streams[2].url.endswith(f"?last_event_id={last_sent[0]}")  # where the page was
    seen = await page.evaluate("window.__seen")
    assert max(seen["lengths"]) <= len(whole)  # no token twice, even for a moment
    assert (await page.text_content(".answer .markdown")).strip() == whole.strip()


async def test_a_refused_question_stays_in_the_box_with_the_reason(page, live_server_url):
    await page.goto("/")
    await page.fill("#question", "   ")  # passes the box's `required`, refused by the server
    async with page.expect_response("**/chat/ask") as response:
        await page.click("#ask-form button[type=submit]")
    assert (await response.value).status == 422
    await wait_for_js(page, "document.querySelector('#form-error').textContent.length > 0")
    assert "non-empty" in await page.text_content("#form-error")
    assert await page.input_value("#question") == "   "
