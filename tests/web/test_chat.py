"""The chat page's views, in process: the POST/GET flow, isolation between owners, CSRF, stop, feedback."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.test import AsyncClient
from django.utils.html import escape

from rag.answers.access import OWNER_COOKIE
from rag.answers.events import LogEvent
from rag.models import Feedback, Message
from rag.web.chat import html_event_stream
from tests.conftest import answer_ended, logs_stored
from tests.factories import add_corpus, group_collection
from tests.sse import SSEParser, parse_sse

pytestmark = pytest.mark.django_db(transaction=True)
HTMX = {"HX-Request": "true"}


async def post_question(client: AsyncClient, question: str, **fields: str):
    return await client.post("/chat/ask", {"question": question, **fields}, headers=HTMX)


def answer_id_in(html: str) -> int:
    return int(re.search(r'sse-connect="/chat/answers/(\d+)/stream"', html).group(1))


async def read_stream(client: AsyncClient, answer_id: int):
    response = await client.get(f"/chat/answers/{answer_id}/stream")
    assert response.status_code == 200
    body = b"".join([chunk async for chunk in response.streaming_content])
    return response, parse_sse(body.decode())


async def test_the_page_renders_with_the_form_and_vendored_scripts(fake_llm):
    response = await AsyncClient().get("/")
    html = response.content.decode()
    assert response.status_code == 200
    assert 'hx-post="/chat/ask"' in html and 'name="csrfmiddlewaretoken"' in html
    assert "/static/vendor/htmx.min.js" in html and "/static/vendor/htmx-ext-sse.js" in html
    assert "cdn" not in html.lower() and "unpkg" not in html.lower()
    assert '<label for="question"' in html


async def test_ask_returns_the_turn_fragment_and_the_stream_delivers_html_events(fake_llm):
    await add_corpus()
    fake_llm.tokens = ["<b>Bananas</b>", " are", " yellow", " [1]"]
    fake_llm.inter_token_ms = 5
    client = AsyncClient()
    response = await post_question(client, "What colour are bananas?", k="2")
    html = response.content.decode()
    assert response.status_code == 200
    assert "What colour are bananas?" in html and 'sse-close="done"' in html
    answer_id = answer_id_in(html)
    assert response["HX-Push-Url"].startswith("/c/")

    stream_response, events = await read_stream(client, answer_id)

    assert stream_response["Content-Type"].startswith("text/event-stream")
    assert stream_response["Cache-Control"] == "no-cache"
    names = [e.type for e in events]
    assert names == ["sources"] + ["token"] * 4 + ["metrics", "done"]
    assert "Bananas" in events[0].data and f'id="src-{answer_id}-1"' in events[0].data
    assert events[1].data == "&lt;b&gt;Bananas&lt;/b&gt;"  # escaped, never markup
    done = events[-1].data
    assert f'id="answer-{answer_id}"' in done and "sse-connect" not in done
    assert re.search(rf'<a [^>]*class="cite" href="#src-{answer_id}-1"', done)
    assert "&lt;b&gt;Bananas&lt;/b&gt;" in done and "<b>Bananas</b>" not in done
    # The pace of the tokens, live and as saved.
    for fragment in (events[-2].data, done):
        assert re.search(r"first token \d+ ms · [\d.]+ tokens/s · gap p95 \d+ ms · 4 tokens", fragment), fragment
    assert (await Message.objects.aget(pk=answer_id)).status == Message.Status.COMPLETE


async def test_a_first_question_gives_the_visitor_an_owner_cookie_and_no_session(fake_llm):
    """The owner key is a cookie of its own: a first question saves no session, and its
    stream reads none."""
    await add_corpus()
    client = AsyncClient()
    response = await post_question(client, "What colour are bananas?")
    assert OWNER_COOKIE in response.cookies and response.cookies[OWNER_COOKIE]["httponly"]
    assert settings.SESSION_COOKIE_NAME not in response.cookies
    assert await Session.objects.acount() == 0
    _, events = await read_stream(client, answer_id_in(response.content.decode()))
    assert events[-1].type == "done"
    assert "What colour are bananas?" in (await client.get("/")).content.decode()
    # Without the cookie, the same visitor is a stranger.
    client.cookies.pop(OWNER_COOKIE)
    assert "What colour are bananas?" not in (await client.get("/")).content.decode()


async def test_reconnecting_to_the_stream_replays_instead_of_generating_again(fake_llm):
    await add_corpus()
    client = AsyncClient()
    answer_id = answer_id_in((await post_question(client, "pgvector?")).content.decode())
    _, first = await read_stream(client, answer_id)
    requests = len(fake_llm.records)

    _, again = await read_stream(client, answer_id)

    assert len(fake_llm.records) == requests
    assert [(e.id, e.type, e.data) for e in again] == [(e.id, e.type, e.data) for e in first]
    key = (await Message.objects.aget(pk=answer_id)).public_id
    assert [e.id for e in first] == [f"{key}.{n}" for n in range(1, len(first) + 1)]


async def test_a_reconnect_with_last_event_id_gets_only_the_events_after_it(fake_llm):
    await add_corpus()
    fake_llm.tokens = ["one", " two", " three", " four"]
    client = AsyncClient()
    answer_id = answer_id_in((await post_question(client, "pgvector?")).content.decode())
    _, first = await read_stream(client, answer_id)

    key = (await Message.objects.aget(pk=answer_id)).public_id
    response = await client.get(f"/chat/answers/{answer_id}/stream", headers={"Last-Event-ID": f"{key}.3"})
    rest = parse_sse(b"".join([chunk async for chunk in response.streaming_content]).decode())

    assert [e.id for e in rest] == [e.id for e in first[3:]]
    # The same events; done renders the sources too, as this page may not show them yet.
    assert [e.data for e in rest[:-1]] == [e.data for e in first[3:-1]]
    assert [e.data for e in rest if e.type == "token"] == [" three", " four"]
    # An id of another answer, or no id at all, starts from the beginning.
    other = await client.get(
        f"/chat/answers/{answer_id}/stream", headers={"Last-Event-ID": "6f1c0d1e-0000-4000-8000-000000000000.3"}
    )
    assert len(parse_sse(b"".join([c async for c in other.streaming_content]).decode())) == len(first)


def without_metrics(html: str) -> str:
    # The live metrics are rounded to 0.1 ms before the template formats them: a reload
    # formats the saved ones, which may round the other way by 1 ms.
    return re.sub(r'<p class="metrics">.*?</p>', "", html).strip()


async def test_a_stream_from_the_start_renders_done_as_a_reload_would_keeping_its_sources(fake_llm):
    await add_corpus()
    fake_llm.tokens = ["**Bananas**", " are yellow", " [1]"]
    client = AsyncClient()
    answer_id = answer_id_in((await post_question(client, "What colour are bananas?", k="2")).content.decode())
    _, events = await read_stream(client, answer_id)
    done = events[-1].data

    # The sources the stream already put on the page stay there (htmx moves them in).
    assert f'<div id="sources-{answer_id}">' in events[0].data
    assert f'<div id="sources-{answer_id}" hx-preserve="true"></div>' in done and "<details" not in done
    # Everything else is what a reload of the saved answer shows.
    reload = (await client.get(f"/chat/answers/{answer_id}")).content.decode()
    sources = re.search(rf'<div id="sources-{answer_id}">.*?</details></div>\n', reload, re.S).group(0)
    assert without_metrics(done.replace(f'<div id="sources-{answer_id}" hx-preserve="true"></div>', sources)) == (
        without_metrics(reload)
    )
    assert re.search(r"first token \d+ ms · .* · 3 tokens · ", done)


async def test_a_resumed_stream_renders_done_from_the_saved_answer_sources_included(fake_llm):
    await add_corpus()
    fake_llm.tokens = ["one", " two", " three"]
    client = AsyncClient()
    answer_id = answer_id_in((await post_question(client, "pgvector?", k="2")).content.decode())
    await read_stream(client, answer_id)
    key = (await Message.objects.aget(pk=answer_id)).public_id

    response = await client.get(f"/chat/answers/{answer_id}/stream", headers={"Last-Event-ID": f"{key}.3"})
    rest = parse_sse(b"".join([chunk async for chunk in response.streaming_content]).decode())

    done = rest[-1].data
    assert rest[-1].type == "done" and "hx-preserve" not in done
    assert f'<div id="sources-{answer_id}"><details' in done and "one two three" in done


async def test_an_answer_that_failed_renders_done_with_its_error(fake_llm):
    await add_corpus()
    client = AsyncClient()
    answer_id = answer_id_in((await post_question(client, "pgvector? fault=drop_after=2")).content.decode())
    _, events = await read_stream(client, answer_id)
    assert [e.type for e in events][-2:] == ["error", "done"]
    answer = await Message.objects.aget(pk=answer_id)
    assert answer.status == Message.Status.ERROR
    assert 'class="answer answer-error"' in events[-1].data and escape(answer.error) in events[-1].data


async def test_a_follow_up_continues_the_conversation(fake_llm):
    await add_corpus()
    client = AsyncClient()
    first = await post_question(client, "What does pgvector add?")
    answer_id = answer_id_in(first.content.decode())
    await read_stream(client, answer_id)
    answer = await Message.objects.aget(pk=answer_id)

    second = await post_question(client, "And indexes?", conversation=str(answer.conversation_id))
    assert "HX-Push-Url" not in second
    second_id = answer_id_in(second.content.decode())
    assert (await Message.objects.aget(pk=second_id)).conversation_id == answer.conversation_id

    page = (await client.get(f"/c/{answer.conversation_id}")).content.decode()
    assert "What does pgvector add?" in page and "And indexes?" in page


async def test_another_session_gets_404_for_everything_of_a_conversation(fake_llm):
    await add_corpus()
    alice, bob = AsyncClient(), AsyncClient()
    answer_id = answer_id_in((await post_question(alice, "Alice's private question")).content.decode())
    conversation_id = (await Message.objects.aget(pk=answer_id)).conversation_id

    assert "Alice&#x27;s private question" not in (await bob.get("/")).content.decode()
    assert (await bob.get(f"/c/{conversation_id}")).status_code == 404
    assert (await bob.get(f"/chat/answers/{answer_id}/stream")).status_code == 404
    assert (await bob.get(f"/chat/answers/{answer_id}")).status_code == 404
    assert (await bob.post(f"/chat/answers/{answer_id}/stop")).status_code == 404
    assert (await bob.post(f"/chat/answers/{answer_id}/regenerate", headers=HTMX)).status_code == 404
    assert (await bob.post(f"/chat/answers/{answer_id}/feedback", {"value": "down"})).status_code == 404
    response = await post_question(bob, "continue it", conversation=str(conversation_id))
    assert response.status_code == 404
    # Alice's question asked the LLM once, and Bob's stream request did not ask it again.
    await answer_ended(answer_id)
    assert len(fake_llm.records) == 1
    assert "Alice&#x27;s private question" in (await alice.get("/")).content.decode()


async def test_signed_in_users_do_not_see_each_others_conversations(fake_llm):
    await add_corpus()
    alice = await User.objects.acreate(username="alice")
    bob = await User.objects.acreate(username="bob")
    alice_client, bob_client = AsyncClient(), AsyncClient()
    await sync_to_async(alice_client.force_login)(alice)
    await sync_to_async(bob_client.force_login)(bob)
    answer_id = answer_id_in((await post_question(alice_client, "Alice asks")).content.decode())
    answer = await Message.objects.select_related("conversation").aget(pk=answer_id)
    assert answer.conversation.user_id == alice.pk

    assert (await bob_client.get(f"/c/{answer.conversation_id}")).status_code == 404
    assert (await bob_client.get(f"/chat/answers/{answer_id}/stream")).status_code == 404
    assert "Alice asks" not in (await bob_client.get("/")).content.decode()
    assert "Alice asks" in (await alice_client.get("/")).content.decode()


async def test_posts_need_a_csrf_token(fake_llm):
    client = AsyncClient(enforce_csrf_checks=True)
    page = await client.get("/")
    assert (await post_question(client, "no token")).status_code == 403
    token = page.cookies["csrftoken"].value
    response = await client.post("/chat/ask", {"question": "with a token"}, headers={**HTMX, "X-CSRFToken": token})
    assert response.status_code == 200
    assert await Message.objects.filter(text="with a token").aexists()


async def test_a_bad_question_is_a_422_fragment_for_the_form(fake_llm):
    response = await post_question(AsyncClient(), "   ")
    assert response.status_code == 422
    assert response["HX-Retarget"] == "#form-error"
    assert "non-empty" in response.content.decode()
    assert await Message.objects.acount() == 0


async def test_a_question_posted_without_javascript_that_fits_the_box_is_taken(fake_llm, settings):
    """A browser counts a line break as one character against the box's maxlength, and a
    form it posts itself (no JavaScript) sends it as two: CRLF."""
    lines = ["What does pgvector add?"] + ["x" * 79] * 30
    question = "\n".join(lines)[: settings.RAG_MAX_QUESTION_CHARS]
    response = await AsyncClient().post("/chat/ask", {"question": question.replace("\n", "\r\n")})
    assert response.status_code == 303
    assert await Message.objects.filter(role=Message.Role.USER, text=question).aexists()


async def test_stop_before_the_stream_connects_stops_the_answer_the_post_started(fake_llm):
    await add_corpus()
    fake_llm.first_token_ms = 2000  # the LLM is still thinking when Stop comes
    client = AsyncClient()
    answer_id = answer_id_in((await post_question(client, "pgvector?")).content.decode())
    assert (await client.post(f"/chat/answers/{answer_id}/stop")).status_code == 204
    _, events = await read_stream(client, answer_id)
    assert [e.type for e in events][-2:] == ["metrics", "done"]
    assert "token" not in [e.type for e in events] and "stopped" in events[-1].data
    assert (await Message.objects.aget(pk=answer_id)).status == Message.Status.STOPPED
    # The LLM was asked at most once, and no request to it is left open.
    assert len(fake_llm.records) <= 1 and all(r.closed_by_client for r in fake_llm.records)


async def test_feedback_is_stored_with_chunk_ids_and_shown_pressed(fake_llm):
    await add_corpus()
    client = AsyncClient()
    answer_id = answer_id_in((await post_question(client, "Bananas?", k="2")).content.decode())
    await read_stream(client, answer_id)
    response = await client.post(f"/chat/answers/{answer_id}/feedback", {"value": "up"}, headers=HTMX)
    assert response.status_code == 200
    assert re.search(r'aria-label="Good answer" aria-pressed="true"', response.content.decode())
    feedback = await Feedback.objects.aget(message_id=answer_id)
    answer = await Message.objects.aget(pk=answer_id)
    assert feedback.value == "up" and feedback.chunk_ids == [s["id"] for s in answer.sources]
    assert (await client.post(f"/chat/answers/{answer_id}/feedback", {"value": "maybe"})).status_code == 400
    detail = (await client.get(f"/chat/answers/{answer_id}")).content.decode()
    assert 'aria-label="Good answer" aria-pressed="true"' in detail


async def test_regenerate_appends_a_new_turn_with_the_same_question(fake_llm):
    await add_corpus()
    client = AsyncClient()
    answer_id = answer_id_in((await post_question(client, "Bananas?")).content.decode())
    await read_stream(client, answer_id)
    response = await client.post(f"/chat/answers/{answer_id}/regenerate", headers=HTMX)
    new_id = answer_id_in(response.content.decode())
    assert new_id != answer_id and "Bananas?" in response.content.decode()


async def test_the_bundled_model_notice_says_how_to_switch(fake_llm, settings, monkeypatch):
    from rag.providers.fake import FakeChat

    bundled = FakeChat(model="SmolLM2-135M-Instruct.Q4_1")
    bundled.is_bundled = True
    monkeypatch.setattr("rag.web.chat.chat_provider", lambda: bundled)
    html = (await AsyncClient().get("/")).content.decode()
    assert "small bundled model" in html and "OPENAI_API_KEY" in html and "RAG_LLM_GGUF" in html
    monkeypatch.setattr("rag.web.chat.chat_provider", lambda: FakeChat())
    assert "small bundled model" not in (await AsyncClient().get("/")).content.decode()


async def test_methods_are_enforced(fake_llm):
    client = AsyncClient()
    assert (await client.get("/chat/ask")).status_code == 405
    assert (await client.post("/chat/answers/1/stream")).status_code == 405


# --- collections: the chat page searches only what the user may read ------------------------------


@sync_to_async
def secret_collection_and_member() -> User:
    _secret, members = group_collection()
    member = User.objects.create_user("member")
    member.groups.add(members)
    return member


async def add_secret() -> int:
    from rag.models import Collection
    from rag.services.documents import aadd_documents

    [result] = await aadd_documents(
        documents=["The vault code is 4711."], collection=await Collection.objects.aget(name="secret")
    )
    return result.document_id


async def test_chat_answers_and_document_pages_only_use_readable_collections(fake_llm):
    member = await secret_collection_and_member()
    await add_corpus()
    secret_id = await add_secret()

    outsider = AsyncClient()
    answer_id = answer_id_in((await post_question(outsider, "What is the vault code?", k="5")).content.decode())
    _, events = await read_stream(outsider, answer_id)
    assert "4711" not in events[0].data and "Bananas" in events[0].data
    assert "4711" not in str(fake_llm.records[-1].request["messages"])
    assert (await outsider.get(f"/chat/documents/{secret_id}")).status_code == 404

    insider = AsyncClient()
    await insider.aforce_login(member)
    answer_id = answer_id_in((await post_question(insider, "What is the vault code?", k="5")).content.decode())
    _, events = await read_stream(insider, answer_id)
    assert "4711" in events[0].data
    assert (await insider.get(f"/chat/documents/{secret_id}")).status_code == 200


async def test_the_collection_picker_lists_readable_collections_and_narrows_the_search(fake_llm):
    from rag.models import Collection

    member = await secret_collection_and_member()
    await add_corpus()
    await add_secret()
    secret = await Collection.objects.aget(name="secret")

    outsider = AsyncClient()
    page = (await outsider.get("/")).content.decode()
    assert 'name="collection"' not in page  # one readable collection: nothing to pick
    assert (await post_question(outsider, "vault?", collection=str(secret.pk))).status_code == 404

    insider = AsyncClient()
    await insider.aforce_login(member)
    page = (await insider.get("/")).content.decode()
    assert f'<option value="{secret.pk}">secret</option>' in page
    answer_id = answer_id_in(
        (await post_question(insider, "What is the vault code?", k="5", collection=str(secret.pk))).content.decode()
    )
    _, events = await read_stream(insider, answer_id)
    assert "4711" in events[0].data and "Bananas" not in events[0].data  # only the chosen collection
    assert (await Message.objects.aget(pk=answer_id)).collection_id == secret.pk


async def test_conversations_asked_anonymously_follow_the_visitor_into_their_account(fake_llm):
    await add_corpus()
    visitor, stranger = AsyncClient(), AsyncClient()
    mine = answer_id_in((await post_question(visitor, "Asked before signing in?")).content.decode())
    await read_stream(visitor, mine)
    theirs = answer_id_in((await post_question(stranger, "Someone else's question?")).content.decode())
    await sync_to_async(User.objects.create_user)("ada", password="pw", is_staff=True)

    # A real login: the session gets a new key (and keeps its data) before user_logged_in.
    login = await visitor.post("/admin/login/", {"username": "ada", "password": "pw", "next": "/admin/"})
    assert login.status_code == 302

    page = (await visitor.get("/")).content.decode()
    assert "Asked before signing in?" in page and "Someone else" not in page
    adopted = await Message.objects.select_related("conversation").aget(pk=mine)
    assert adopted.conversation.user_id is not None
    assert (await Message.objects.select_related("conversation").aget(pk=theirs)).conversation.user_id is None
    _, events = await read_stream(visitor, mine)  # still theirs to open, now through the account
    assert "done" in [e.type for e in events]


async def test_more_chat_streams_than_pooled_connections_all_answer(live_server_url, fake_llm):
    """Each stream gives its database connection back before it waits on the LLM: with
    one held per stream, the pool (20) ran dry and the 21st visitor got a 500 once the pool's
    timeout (1 s for the test server) ran out."""
    await add_corpus()
    # Every stream waits on the LLM at the same time, past the pool's timeout (1 s) and well
    # within the LLM's (2 s), on a machine busy with 24 streams.
    fake_llm.first_token_ms = 1200
    fake_llm.tokens = ["fine"]

    async def visit(i: int) -> tuple[int, str, int]:
        jar = aiohttp.CookieJar(unsafe=True)  # the server is an IP address
        async with aiohttp.ClientSession(cookie_jar=jar, timeout=aiohttp.ClientTimeout(total=30)) as http:
            page = await (await http.get(f"{live_server_url}/")).text()
            token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
            data = {"question": f"Question {i} about Django?", "csrfmiddlewaretoken": token}
            async with http.post(f"{live_server_url}/chat/ask", data=data, headers=HTMX) as asked:
                answer_id = answer_id_in(await asked.text())
            async with http.get(f"{live_server_url}/chat/answers/{answer_id}/stream") as streamed:
                return streamed.status, await streamed.text(), answer_id

    results = await asyncio.gather(*(visit(i) for i in range(24)))
    assert [status for status, _, _ in results] == [200] * 24
    assert all("event: done" in body and "event: error" not in body for _, body, _ in results)
    await logs_stored([answer_id for _, _, answer_id in results])


async def test_the_chat_stream_dropped_mid_answer_over_http_resumes_where_it_broke(live_server_url, fake_llm):
    """A real connection to daphne, cut after a few tokens: the answer goes on, and the
    EventSource's reconnect (Last-Event-ID, same URL) gets exactly the rest."""
    await add_corpus()
    fake_llm.tokens = [f"w{i} " for i in range(30)]
    fake_llm.inter_token_ms = 20
    jar = aiohttp.CookieJar(unsafe=True)  # the server is an IP address
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        page = await (await http.get(f"{live_server_url}/")).text()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        form = {"question": "What does pgvector add?", "csrfmiddlewaretoken": token}
        async with http.post(f"{live_server_url}/chat/ask", data=form, headers=HTMX) as asked:
            stream_url = f"{live_server_url}/chat/answers/{answer_id_in(await asked.text())}/stream"
        parser, before = SSEParser(), []
        response = await http.get(stream_url)
        async for chunk in response.content.iter_any():
            before += parser.feed(chunk)
            if sum(e.type == "token" for e in before) >= 3:
                break
        response.close()  # the connection drops mid-answer
        last_id = [e.id for e in before if e.id][-1]
        async with http.get(stream_url, headers={"Last-Event-ID": last_id}) as again:
            after = SSEParser().feed(await again.read())

    tokens = [e.data for e in before + after if e.type == "token"]
    assert "".join(tokens) == "".join(fake_llm.tokens)  # no gap, no duplicate
    ids = [e.id for e in before + after if e.id]
    assert len(ids) == len(set(ids)) and after[-1].type == "done"
    assert len(fake_llm.records) == 1 and not fake_llm.records[0].closed_by_client
    await logs_stored([int(stream_url.split("/")[-2])])


async def test_access_removed_hides_the_stored_answer_and_keeps_it_out_of_the_next_prompt(fake_llm):
    member = await secret_collection_and_member()
    await add_corpus()
    await add_secret()
    fake_llm.tokens = ["The", " code", " is", " 4711", " [1]"]
    client = AsyncClient()
    await client.aforce_login(member)
    first = await post_question(client, "What is the vault code?", k="5")
    answer_id = answer_id_in(first.content.decode())
    await read_stream(client, answer_id)
    conversation_id = (await Message.objects.aget(pk=answer_id)).conversation_id
    assert "4711" in (await client.get(f"/c/{conversation_id}")).content.decode()

    await member.groups.aclear()  # removed from the group that may read the vault's collection

    page = (await client.get(f"/c/{conversation_id}")).content.decode()
    assert "4711" not in page and "can no longer read" in page
    detail = (await client.get(f"/chat/answers/{answer_id}")).content.decode()
    assert "4711" not in detail and "can no longer read" in detail
    fake_llm.tokens = ["Sorry"]
    asked_before = len(fake_llm.records)
    follow_up = await post_question(client, "And the code again?", conversation=str(conversation_id))
    await read_stream(client, answer_id_in(follow_up.content.decode()))
    since = fake_llm.records[asked_before:]  # the follow-up's requests (condensing, answering)
    assert since and all("4711" not in str(record.request["messages"]) for record in since)


async def test_done_renders_from_a_log_written_before_the_gap_figures():
    """A process of the previous version may have written the log this stream reads."""
    metrics = {"status": "complete", "model": "old-model", "tokens": 1, "ttft_ms": 12.0}  # no gap, no tokens/s
    log = [("sources", []), ("token", "Hello"), ("metrics", metrics), ("done", {"status": "complete"})]

    async def events():
        for seq, (kind, data) in enumerate(log, start=1):
            yield LogEvent(7, "k", seq, kind, data)

    body = b"".join([chunk async for chunk in html_event_stream(events(), answer_id=7, heartbeat=10)])
    done = parse_sse(body.decode())[-1]
    assert (done.type, done.id) == ("done", "k.4") and "Hello" in done.data and "old-model" in done.data
