"""The WebSocket consumer, through the real ASGI application (origin check, auth, routing)."""

from __future__ import annotations

import asyncio
import re

import pytest
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from django.test import AsyncClient

from rag.answers.access import OWNER_COOKIE
from rag.models import Message
from ragsite.asgi import application
from tests.factories import add_corpus, agroup_collection

pytestmark = pytest.mark.django_db(transaction=True)
ORIGIN = [(b"origin", b"http://127.0.0.1:8000"), (b"host", b"127.0.0.1:8000")]


async def connect(session: str | None = None) -> WebsocketCommunicator:
    headers = ORIGIN + ([(b"cookie", f"{settings.SESSION_COOKIE_NAME}={session}".encode())] if session else [])
    communicator = WebsocketCommunicator(application, "/ws/rag/", headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def receive_until_done(communicator: WebsocketCommunicator) -> list[dict]:
    messages = []
    while True:
        message = await communicator.receive_json_from(timeout=10)
        messages.append(message)
        if message["type"] == "done":
            return messages


async def test_a_full_answer(fake_llm):
    await add_corpus()
    fake_llm.tokens = ["Bananas", " are", " yellow", " [1]"]
    communicator = await connect()
    await communicator.send_json_to({"type": "ask", "question": "What colour are bananas?", "k": 2})
    messages = await receive_until_done(communicator)

    assert [m["type"] for m in messages] == ["started", "sources"] + ["token"] * 4 + ["metrics", "done"]
    assert messages[1]["sources"][0]["title"] == "Bananas" and len(messages[1]["sources"]) == 2
    assert "".join(m["text"] for m in messages if m["type"] == "token") == "Bananas are yellow [1]"
    assert messages[-2]["status"] == "complete" and messages[-1]["status"] == "complete"
    answer = await Message.objects.aget(pk=messages[0]["answer_id"])
    assert answer.text == "Bananas are yellow [1]"

    # A follow-up on the same socket continues the conversation.
    conversation_id = messages[0]["conversation_id"]
    await communicator.send_json_to({"type": "ask", "question": "And why?", "conversation_id": conversation_id})
    follow_up = await receive_until_done(communicator)
    assert follow_up[0]["conversation_id"] == conversation_id
    await communicator.disconnect()


async def test_stop_closes_the_upstream_request_and_keeps_the_partial_answer(fake_llm):
    await add_corpus()
    fake_llm.tokens = [f"t{i} " for i in range(100)]
    fake_llm.inter_token_ms = 20
    communicator = await connect()
    await communicator.send_json_to({"type": "ask", "question": "pgvector?", "k": 1})
    messages = []
    while len([m for m in messages if m["type"] == "token"]) < 3:
        messages.append(await communicator.receive_json_from(timeout=10))
    await communicator.send_json_to({"type": "stop"})
    messages += await receive_until_done(communicator)

    record = await asyncio.to_thread(fake_llm.wait_for_close, timeout=5)
    assert record.closed_by_client and record.tokens_sent < 100
    answer_id = messages[0]["answer_id"]
    key = messages[1]["id"].split(".")[0]
    assert messages[-1] == {
        "type": "done",
        "answer_id": answer_id,
        "status": "stopped",
        "id": f"{key}.{len(messages) - 1}",
    }
    answer = await Message.objects.aget(pk=messages[0]["answer_id"])
    assert answer.status == Message.Status.STOPPED
    assert answer.text == "".join(m["text"] for m in messages if m["type"] == "token")
    await communicator.disconnect()


async def test_an_upstream_error_is_an_error_message_then_done(fake_llm):
    await add_corpus()
    communicator = await connect()
    await communicator.send_json_to({"type": "ask", "question": "pgvector? fault=http500"})
    messages = await receive_until_done(communicator)
    error = next(m for m in messages if m["type"] == "error")
    assert error["code"] == "upstream_error" and "HTTP 500" in error["message"]
    assert messages[-1]["status"] == "error"
    await communicator.disconnect()


@pytest.mark.parametrize(
    ("payload", "hint"),
    [
        ("not json", "Send JSON"),
        ("[1, 2]", "JSON object"),
        ('{"type": "dance"}', "use 'ask', 'stop' or 'resume'"),
        ('{"type": "ask", "question": ""}', "non-empty"),
        ('{"type": "ask", "question": "q", "k": 0}', "'k' must be"),
        ('{"type": "ask", "question": "q", "conversation_id": "nope"}', "UUID"),
        ('{"type": "ask", "question": "q", "collection": 5}', "'collection' must be a collection's name"),
        ('{"type": "ask", "question": "q", "collection": "nowhere"}', "no collection named 'nowhere'"),
        ('{"type": "ask", "question": "q", "conversationId": "x"}', "Unknown key 'conversationId' in 'ask'"),
        ('{"type": "resume", "last_id": "x"}', "it takes last_event_id, type"),
        ('{"type": "stop"}', "Nothing to stop"),
    ],
)
async def test_bad_input_gets_an_error_that_says_what_to_fix(fake_llm, payload, hint):
    communicator = await connect()
    await communicator.send_to(text_data=payload)
    message = await communicator.receive_json_from(timeout=5)
    assert message["type"] == "error" and message["code"] == "bad_request"
    assert hint in message["message"]
    assert await Message.objects.acount() == 0
    await communicator.disconnect()


async def test_one_question_at_a_time_and_no_foreign_conversations(fake_llm):
    await add_corpus()
    fake_llm.tokens = [f"t{i} " for i in range(30)]
    fake_llm.inter_token_ms = 20
    other = await connect()
    await other.send_json_to({"type": "ask", "question": "someone else's"})
    foreign = (await receive_until_done(other))[0]["conversation_id"]
    await other.disconnect()

    communicator = await connect()
    await communicator.send_json_to({"type": "ask", "question": "continue", "conversation_id": foreign})
    refused = await communicator.receive_json_from(timeout=5)
    assert refused["type"] == "error" and "No such conversation" in refused["message"]

    await communicator.send_json_to({"type": "ask", "question": "first"})
    assert (await communicator.receive_json_from(timeout=5))["type"] == "started"
    await communicator.send_json_to({"type": "ask", "question": "second"})
    messages = []
    while not any(m["type"] == "error" for m in messages):
        messages.append(await communicator.receive_json_from(timeout=5))
    assert "One question at a time" in messages[-1]["message"]
    await communicator.disconnect()


async def signed_in_session(username: str) -> str:
    client = AsyncClient()
    await client.aforce_login(await User.objects.acreate(username=username))
    return client.cookies[settings.SESSION_COOKIE_NAME].value


async def test_closing_the_socket_does_not_stop_the_answer_and_a_new_socket_resumes_it(fake_llm):
    await add_corpus()
    fake_llm.tokens = [f"t{i} " for i in range(30)]
    fake_llm.inter_token_ms = 10
    session = await signed_in_session("alice")
    communicator = await connect(session)
    await communicator.send_json_to({"type": "ask", "question": "pgvector?"})
    started = await communicator.receive_json_from(timeout=5)
    seen = []
    while not seen or seen[-1]["type"] != "token":
        seen.append(await communicator.receive_json_from(timeout=5))
    await communicator.disconnect()

    again = await connect(session)  # the same user, on a new socket
    await again.send_json_to({"type": "resume", "last_event_id": seen[-1]["id"]})
    rest = await receive_until_done(again)
    await again.disconnect()

    tokens = [m["text"] for m in seen + rest if m["type"] == "token"]
    assert "".join(tokens) == "".join(fake_llm.tokens)  # no gap, no duplicate
    key, seq = seen[-1]["id"].split(".")
    assert rest[0]["id"] == f"{key}.{int(seq) + 1}"
    assert rest[-1]["status"] == "complete"
    assert not fake_llm.records[-1].closed_by_client
    answer = await Message.objects.aget(pk=started["answer_id"])
    assert answer.status == Message.Status.COMPLETE and answer.text == "".join(fake_llm.tokens)


async def test_resume_needs_an_event_id_of_ones_own_answer(fake_llm):
    await add_corpus()
    theirs = await connect(await signed_in_session("bob"))
    await theirs.send_json_to({"type": "ask", "question": "private"})
    their_events = await receive_until_done(theirs)
    their_id = their_events[1]["id"]
    await theirs.disconnect()

    mine = await connect(await signed_in_session("mallory"))
    await mine.send_json_to({"type": "resume", "last_event_id": "nonsense"})
    assert "last_event_id" in (await mine.receive_json_from(timeout=5))["message"]
    await mine.send_json_to({"type": "resume", "last_event_id": their_id})
    reply = await mine.receive_json_from(timeout=5)
    assert reply["code"] == "bad_request" and "No such answer" in reply["message"]
    await mine.disconnect()


@pytest.mark.parametrize(
    "origin",
    [
        b"https://evil.example",  # another site
        b"http://127.0.0.1:9999",  # another port of this host: browsers send it the same cookies
        b"http://evil.example:8000",  # another host on this port
        b"null",  # a sandboxed frame or a file
        None,  # no Origin: not a browser's handshake
    ],
)
async def test_a_socket_from_anywhere_but_this_sites_pages_is_refused(fake_llm, origin):
    headers = [(b"host", b"127.0.0.1:8000")] + ([(b"origin", origin)] if origin else [])
    communicator = WebsocketCommunicator(application, "/ws/rag/", headers=headers)
    connected, _ = await communicator.connect()
    assert not connected


async def test_a_secure_socket_needs_a_secure_page(fake_llm):
    headers = [(b"host", b"127.0.0.1:8000"), (b"origin", b"http://127.0.0.1:8000")]
    communicator = WebsocketCommunicator(application, "/ws/rag/", headers=headers)
    communicator.scope["scheme"] = "wss"
    connected, _ = await communicator.connect()
    assert not connected


async def test_an_anonymous_socket_gets_no_chunk_of_a_restricted_collection(fake_llm):
    from rag.models import Collection
    from rag.services.documents import aadd_documents

    await add_corpus()
    secret = await Collection.objects.acreate(name="secret", visibility=Collection.Visibility.STAFF)
    await aadd_documents(documents=["The vault code is 4711."], collection=secret)
    communicator = await connect()
    await communicator.send_json_to({"type": "ask", "question": "What is the vault code?", "k": 5})
    messages = await receive_until_done(communicator)
    [sources] = [m["sources"] for m in messages if m["type"] == "sources"]
    assert sources and all("4711" not in s["snippet"] for s in sources)
    assert "4711" not in str(fake_llm.records[-1].request["messages"])
    await communicator.disconnect()


async def test_a_signed_in_group_member_gets_the_group_collection_and_nobody_elses_conversation(fake_llm):

    from rag.services.documents import aadd_documents

    await add_corpus()
    secret, members = await agroup_collection()
    await aadd_documents(documents=["The vault code is 4711."], collection=secret)
    member_session = await signed_in_session("member")
    member = await User.objects.aget(username="member")
    await member.groups.aadd(members)
    outsider_session = await signed_in_session("outsider")

    communicator = await connect(member_session)
    await communicator.send_json_to({"type": "ask", "question": "What is the vault code?", "k": 5})
    messages = await receive_until_done(communicator)
    await communicator.disconnect()
    [sources] = [m["sources"] for m in messages if m["type"] == "sources"]
    assert any("4711" in s["snippet"] for s in sources)  # the member reads the group's collection
    conversation_id = messages[0]["conversation_id"]

    outsider = await connect(outsider_session)
    await outsider.send_json_to({"type": "ask", "question": "And the code?", "conversation_id": conversation_id})
    refused = await outsider.receive_json_from(timeout=5)
    await outsider.send_json_to({"type": "resume", "last_event_id": messages[-1]["id"]})
    not_resumed = await outsider.receive_json_from(timeout=5)
    await outsider.disconnect()
    assert refused["code"] == "bad_request" and "No such conversation" in refused["message"]
    assert not_resumed["code"] == "bad_request" and "No such answer" in not_resumed["message"]
    assert await Message.objects.filter(conversation_id=conversation_id).acount() == 2  # nothing added to it


async def test_collection_narrows_the_search_to_one_the_asker_may_read(fake_llm):
    """As on /rag/stream: by name, never wider than what the asker may read; a follow-up
    (regenerate too) keeps it, since it is the turn's."""
    from rag.services.documents import aadd_documents

    await add_corpus()
    secret, members = await agroup_collection()
    await aadd_documents(documents=["The vault code is 4711."], collection=secret)
    member_session = await signed_in_session("member")
    await (await User.objects.aget(username="member")).groups.aadd(members)

    member = await connect(member_session)
    await member.send_json_to({"type": "ask", "question": "pgvector?", "k": 5, "collection": "secret"})
    messages = await receive_until_done(member)
    await member.disconnect()
    [sources] = [m["sources"] for m in messages if m["type"] == "sources"]
    assert sources and all("4711" in s["snippet"] for s in sources)  # only the named collection
    answer = await Message.objects.aget(pk=messages[0]["answer_id"])
    assert answer.collection_id == secret.pk

    anonymous = await connect()
    await anonymous.send_json_to({"type": "ask", "question": "The vault code?", "collection": "secret"})
    refused = await anonymous.receive_json_from(timeout=5)
    await anonymous.disconnect()
    # The same words as for a collection that does not exist: its name reveals nothing.
    assert refused["code"] == "bad_request" and "no collection named 'secret'" in refused["message"]
    assert await Message.objects.acount() == 2  # the member's question and answer only


async def test_an_open_socket_reads_with_the_users_flags_as_they_are_now(fake_llm):
    """Staff access removed while a socket is open takes effect on its next question."""
    from rag.models import Collection
    from rag.services.documents import aadd_documents

    await add_corpus()
    secret = await Collection.objects.acreate(name="staffonly", visibility=Collection.Visibility.STAFF)
    await aadd_documents(documents=["The staff room code is 0815."], collection=secret)
    session = await signed_in_session("former")
    await User.objects.filter(username="former").aupdate(is_staff=True)
    communicator = await connect(session)

    async def sources_of(question: str) -> str:
        await communicator.send_json_to({"type": "ask", "question": question, "k": 5})
        messages = await receive_until_done(communicator)
        return str([m["sources"] for m in messages if m["type"] == "sources"])

    assert "0815" in await sources_of("What is the staff room code?")
    await User.objects.filter(username="former").aupdate(is_staff=False)  # no longer staff
    assert "0815" not in await sources_of("And the staff room code again?")
    await communicator.disconnect()


async def test_an_anonymous_visitors_socket_is_theirs_by_the_owner_cookie(fake_llm):
    """An answer asked on the chat page resumes on a socket from the same browser (its
    rag_owner cookie), and on no other."""
    await add_corpus()
    page = AsyncClient()
    asked = await page.post("/chat/ask", {"question": "pgvector?"}, headers={"HX-Request": "true"})
    owner_key = asked.cookies[OWNER_COOKIE].value
    answer_id = int(re.search(r"/chat/answers/(\d+)/stream", asked.content.decode()).group(1))
    key = (await Message.objects.aget(pk=answer_id)).public_id

    def socket(cookie: str | None) -> WebsocketCommunicator:
        headers = ORIGIN + ([(b"cookie", f"{OWNER_COOKIE}={cookie}".encode())] if cookie else [])
        return WebsocketCommunicator(application, "/ws/rag/", headers=headers)

    theirs = socket(owner_key)
    assert (await theirs.connect())[0]
    await theirs.send_json_to({"type": "resume", "last_event_id": f"{key}.1"})
    rest = await receive_until_done(theirs)
    assert rest[0]["id"] == f"{key}.2" and rest[-1]["answer_id"] == answer_id
    await theirs.disconnect()

    for cookie in (None, "s" * 32):  # no cookie; someone else's key
        stranger = socket(cookie)
        assert (await stranger.connect())[0]
        await stranger.send_json_to({"type": "resume", "last_event_id": f"{key}.1"})
        assert "No such answer" in (await stranger.receive_json_from(timeout=5))["message"]
        await stranger.disconnect()


async def test_a_question_the_database_cannot_be_reached_for_is_an_error_and_the_socket_stays(
    fake_llm, database_down, monkeypatch
):
    await add_corpus()
    communicator = await connect()
    monkeypatch.setattr(connection.pool, "timeout", 1.0)  # not the 10 s a server waits
    await database_down.refuse()

    await communicator.send_json_to({"type": "ask", "question": "What does pgvector add?"})
    message = await communicator.receive_json_from(timeout=10)
    assert message["code"] == "unavailable" and "database cannot be reached" in message["message"]

    await database_down.allow()
    await communicator.send_json_to({"type": "ask", "question": "What does pgvector add?"})
    assert (await receive_until_done(communicator))[-1]["status"] == "complete"
    await communicator.disconnect()
