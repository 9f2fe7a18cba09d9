"""The knowledge base in the admin, as a staff user uses it: real forms, CSRF, the worker, permissions."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.auth.models import Group, User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from rag.models import Chunk, Collection, Conversation, Document, Feedback, Message
from rag.services import ingestion
from ragsite.session_store import SessionStore
from tests.conftest import wait_until
from tests.factories import add_corpus, group_collection
from tests.files import encrypted_pdf_bytes, pdf_bytes
from tests.sse import SSEParser
from tests.worker import pending_tasks, run_worker

pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = reverse("admin:rag_document_changelist")
ADD = reverse("admin:rag_document_add")
STATUS = reverse("admin:rag_document_status")
TRY = reverse("admin:rag_document_try_query")


def staff_client(*, superuser: bool = True, groups: list[Group] = ()) -> Client:
    user = User.objects.create_user(username=f"staff{User.objects.count()}", password="pw", is_staff=True)
    user.is_superuser = superuser
    user.save()
    user.groups.set(groups)
    if not superuser:
        from django.contrib.auth.models import Permission

        user.user_permissions.set(Permission.objects.filter(content_type__app_label="rag"))
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def csrf_token(client: Client, url: str) -> str:
    response = client.get(url)
    assert response.status_code == 200
    return re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', response.content).group(1).decode()


def upload(client: Client, *, collection: Collection, files=(), title="", text="") -> object:
    token = csrf_token(client, ADD)
    data = {"csrfmiddlewaretoken": token, "collection": collection.pk, "title": title, "text": text}
    if files:
        data["files"] = [SimpleUploadedFile(name, content) for name, content in files]
    return client.post(ADD, data, follow=True)


@pytest.fixture
def kb() -> Collection:
    return Collection.objects.create(name="kb")


def test_upload_a_mix_watch_it_become_ready_and_see_why_bad_files_failed(kb):
    client = staff_client()
    response = upload(
        client,
        collection=kb,
        files=[
            ("notes.md", b"# Notes\n\nBananas are yellow."),
            ("paper.pdf", pdf_bytes("Cherries are red.")),
            ("locked.pdf", encrypted_pdf_bytes("secret")),
            ("photo.png", b"\x89PNG"),
        ],
        title="Pasted",
        text="Plums are purple.",
    )
    assert response.status_code == 200 and response.redirect_chain[-1][0] == CHANGELIST
    page = response.content.decode()
    assert "Queued: notes.md." in page and "Failed: photo.png: files of type .png are not supported" in page
    assert pending_tasks() == 4  # the png failed at once, without a task
    statuses = dict(Document.objects.values_list("source", "status"))
    assert statuses == {
        "notes.md": "queued",
        "paper.pdf": "queued",
        "locked.pdf": "queued",
        "photo.png": "failed",
        "Pasted.md": "queued",
    }
    assert not Chunk.objects.exists()  # nothing was ingested in the request

    ids = ",".join(str(pk) for pk in Document.objects.values_list("pk", flat=True))
    before = client.get(STATUS, {"ids": ids}).json()["documents"]
    assert {row["status"] for row in before} == {"queued", "failed"}

    run_worker()
    after = {row["pk"]: row for row in client.get(STATUS, {"ids": ids}).json()["documents"]}
    by_source = {d.source: after[d.pk] for d in Document.objects.all()}
    assert {s: r["status"] for s, r in by_source.items()} == {
        "notes.md": "ready",
        "paper.pdf": "ready",
        "locked.pdf": "failed",
        "photo.png": "failed",
        "Pasted.md": "ready",
    }
    assert "password" in by_source["locked.pdf"]["error"]
    assert by_source["notes.md"]["chunk_count"] == 1 and by_source["notes.md"]["embedding_model"] == "fake-embed"

    listing = client.get(CHANGELIST).content.decode()
    assert "protected by a password" in listing
    assert "document_status.js" in listing  # the poller that updates the list without a reload
    assert 'data-field="status"' in listing


def test_upload_without_csrf_token_is_refused(kb):
    client = staff_client()
    response = client.post(ADD, {"collection": kb.pk, "text": "Sneaky."})
    assert response.status_code == 403
    assert not Document.objects.exists()


def test_non_staff_cannot_reach_the_admin_or_the_status_view(kb):
    user = User.objects.create_user(username="visitor", password="pw")
    client = Client()
    client.force_login(user)
    assert client.get(ADD).status_code == 302  # to the admin login
    assert client.get(STATUS, {"ids": "1"}).status_code == 302


def test_same_file_twice_says_it_already_exists(kb):
    client = staff_client()
    upload(client, collection=kb, files=[("a.md", b"Apples are crunchy.")])
    response = upload(client, collection=kb, files=[("again.md", b"Apples are crunchy.")])
    assert "already exists" in response.content.decode()
    assert Document.objects.count() == 1 and pending_tasks() == 1


def test_empty_form_says_what_to_do(kb):
    response = upload(staff_client(), collection=kb)
    assert "Choose one or more files, or paste some text." in response.content.decode()
    assert not Document.objects.exists()


def test_actions_reingest_reembed_and_delete(kb):
    client = staff_client()
    upload(client, collection=kb, files=[("a.md", b"Apples are crunchy.")])
    run_worker()
    doc = Document.objects.get()
    for action in ("reingest", "reembed"):
        token = csrf_token(client, CHANGELIST)
        response = client.post(
            CHANGELIST, {"csrfmiddlewaretoken": token, "action": action, "_selected_action": [doc.pk]}, follow=True
        )
        assert "queued" in response.content.decode()
        assert Document.objects.get().status == "queued"
        run_worker()
        assert Document.objects.get().status == "ready"
    token = csrf_token(client, CHANGELIST)
    client.post(
        CHANGELIST,
        {"csrfmiddlewaretoken": token, "action": "delete_selected", "_selected_action": [doc.pk], "post": "yes"},
    )
    assert not Document.objects.exists()
    assert not Chunk.objects.exists()


def test_chunks_view_and_try_a_query(kb, settings):
    settings.RAG_CHUNK_MIN_TOKENS = 0  # each of the two small sections a chunk of its own
    client = staff_client()
    upload(client, collection=kb, text="# Fruit\n\nBananas are yellow.\n\n# Veg\n\nCarrots are orange.", title="Food")
    run_worker()
    doc = Document.objects.get()
    page = client.get(reverse("admin:rag_document_chunks", args=[doc.pk])).content.decode()
    assert "Bananas are yellow." in page and "Carrots are orange." in page

    token = csrf_token(client, TRY)
    response = client.post(
        TRY, {"csrfmiddlewaretoken": token, "question": "yellow bananas", "collection": kb.pk, "k": 1}
    )
    page = response.content.decode()
    assert "Bananas are yellow." in page and "Carrots" not in page
    assert re.search(r"<td>0\.\d{4}</td>", page)  # the score


def test_try_a_query_takes_a_metadata_filter(kb):
    client = staff_client()
    upload(client, collection=kb, text="Bananas are yellow.", title="Fruit")
    upload(client, collection=kb, text="Bananas are a crop.", title="Farming")
    run_worker()
    Document.objects.filter(title="Fruit").update(metadata={"kind": "food"})
    Document.objects.filter(title="Farming").update(metadata={"kind": "agriculture", "year": 2020})
    token = csrf_token(client, TRY)
    data = {"csrfmiddlewaretoken": token, "question": "bananas", "collection": kb.pk, "k": 5}
    page = client.post(TRY, {**data, "filter": '{"kind": "agriculture"}'}).content.decode()
    assert "Bananas are a crop." in page and "Bananas are yellow." not in page
    page = client.post(TRY, {**data, "filter": '{"year": {"before": 2021}}'}).content.decode()
    assert "Unknown operator &#x27;before&#x27; on &#x27;year&#x27;" in page and "Bananas" not in page


def test_staff_outside_the_group_see_nothing_of_a_restricted_collection(kb):
    secret, members = group_collection()
    ingestion.submit_text(collection=secret, title="Secret", text="The vault code is 1234.")
    ingestion.submit_text(collection=kb, title="Public", text="The shop opens at nine.")
    run_worker()
    secret_doc = Document.objects.get(collection=secret)

    outsider = staff_client(superuser=False)
    assert "Secret" not in outsider.get(CHANGELIST).content.decode()
    assert outsider.get(reverse("admin:rag_document_chunks", args=[secret_doc.pk])).status_code == 404
    assert outsider.get(STATUS, {"ids": secret_doc.pk}).json() == {"documents": []}
    token = csrf_token(outsider, TRY)
    page = outsider.post(TRY, {"csrfmiddlewaretoken": token, "question": "vault code", "k": 5}).content.decode()
    assert "1234" not in page and "shop opens" in page
    # Choosing the collection by id is refused by the form, not answered.
    page = outsider.post(
        TRY, {"csrfmiddlewaretoken": token, "question": "vault code", "collection": secret.pk, "k": 5}
    ).content.decode()
    assert "1234" not in page and "Select a valid choice" in page

    member = staff_client(superuser=False, groups=[members])
    token = csrf_token(member, TRY)
    page = member.post(TRY, {"csrfmiddlewaretoken": token, "question": "vault code", "k": 5}).content.decode()
    assert "1234" in page


def test_staff_outside_the_group_cannot_change_a_restricted_collection_either(kb):
    """The write paths, not only the views: actions, uploads and the collection admin."""
    secret, _members = group_collection()
    ingestion.submit_text(collection=secret, title="Secret", text="The vault code is 1234.")
    run_worker()
    secret_doc = Document.objects.get(collection=secret)
    outsider = staff_client(superuser=False)

    for action in ("reingest", "reembed", "delete_selected"):
        token = csrf_token(outsider, CHANGELIST)
        data = {"csrfmiddlewaretoken": token, "action": action, "_selected_action": [secret_doc.pk], "post": "yes"}
        outsider.post(CHANGELIST, data)
        assert Document.objects.get(pk=secret_doc.pk).status == "ready"  # neither queued nor deleted
    assert pending_tasks() == 0

    response = upload(outsider, collection=secret, files=[("planted.md", b"Planted text.")])
    assert "Select a valid choice" in response.content.decode()
    assert not Document.objects.filter(source="planted.md").exists()

    collections = reverse("admin:rag_collection_changelist")
    assert "secret" not in outsider.get(collections).content.decode()
    assert outsider.get(reverse("admin:rag_collection_change", args=[secret.pk]), follow=True).redirect_chain
    token = csrf_token(outsider, collections)
    data = {"csrfmiddlewaretoken": token, "action": "reembed_all", "_selected_action": [secret.pk]}
    outsider.post(collections, data)
    assert pending_tasks() == 0 and Document.objects.get(pk=secret_doc.pk).status == "ready"


def test_collection_admin_restricts_and_reembeds_a_whole_collection(kb):
    client = staff_client()
    members = Group.objects.create(name="members")
    add = reverse("admin:rag_collection_add")
    token = csrf_token(client, add)
    response = client.post(
        add,
        {"csrfmiddlewaretoken": token, "name": "private", "visibility": "groups", "groups": [members.pk]},
    )
    assert response.status_code == 302
    private = Collection.objects.get(name="private")
    assert (private.visibility, list(private.groups.all())) == ("groups", [members])

    ingestion.submit_text(collection=kb, title="One", text="First text.")
    ingestion.submit_text(collection=kb, title="Two", text="Second text.")
    run_worker()
    changelist = reverse("admin:rag_collection_changelist")
    token = csrf_token(client, changelist)
    response = client.post(
        changelist,
        {"csrfmiddlewaretoken": token, "action": "reembed_all", "_selected_action": [kb.pk]},
        follow=True,
    )
    assert "2 document(s) queued for re-embedding" in response.content.decode()
    assert run_worker() == 2
    assert set(Document.objects.values_list("status", flat=True)) == {"ready"}


# --- answers, speed and feedback -------------------------------------------------------------------


@pytest.fixture
def answer() -> Message:
    conversation = Conversation.objects.create(session_key="s", title="Bananas?")
    Message.objects.create(conversation=conversation, role="user", text="Bananas?")
    answer = Message.objects.create(
        conversation=conversation, role="assistant", text="Yellow [1]", model="fake-chat",
        ttft_ms=100.0, total_ms=1100.0, tokens=11, sources=[{"id": 5, "n": 1}],
        tokens_per_s=10.0, gap_p50_ms=98.5, gap_p95_ms=123.45, gap_max_ms=250.75,
    )  # fmt: skip
    Feedback.objects.create(message=answer, value="down", chunk_ids=[5])
    return answer


def test_staff_see_answers_with_metrics_and_feedback_filterable(client, answer):
    client.force_login(User.objects.create_superuser("admin", "a@example.com", "pw"))
    page = client.get("/admin/rag/message/", {"status__exact": "complete", "model": "fake-chat"})
    html = page.content.decode()
    assert page.status_code == 200
    assert "Yellow [1]" in html and ">down<" in html
    # Speed and steadiness columns, with their values.
    assert 'column-tokens_per_s">' in html and 'class="field-tokens_per_s">10.0<' in html
    assert 'column-gap_p95_ms">' in html and 'class="field-gap_p95_ms">123.45<' in html
    detail = client.get(f"/admin/rag/message/{answer.pk}/change/").content.decode()
    for label, value in [
        ("Tokens/s", "10.0"),
        ("Inter-token gap p50 (ms)", "98.5"),
        ("Inter-token gap p95 (ms)", "123.45"),
        ("Inter-token gap max (ms)", "250.75"),
    ]:
        shown = rf'<label>{re.escape(label)}:</label>\s*<div class="readonly">{re.escape(value)}</div>'
        assert re.search(shown, detail), label
    feedback = client.get("/admin/rag/feedback/").content.decode()
    assert "[5]" in feedback
    assert client.get(f"/admin/rag/feedback/{answer.feedback.pk}/change/").status_code == 200
    conversation = client.get(f"/admin/rag/conversation/{answer.conversation_id}/change/")
    assert conversation.status_code == 200 and "123.45" in conversation.content.decode()  # the inline's gap p95


def test_the_newest_messages_come_first(client, answer):
    later = Message.objects.create(conversation=answer.conversation, role="user", text="And plantains?")
    client.force_login(User.objects.create_superuser("admin", "a@example.com", "pw"))
    html = client.get("/admin/rag/message/").content.decode()
    assert html.index("And plantains?") < html.index("Yellow [1]") < html.index("Bananas?")
    assert later.pk > answer.pk


def test_the_admin_is_staff_only(client, answer):
    assert client.get("/admin/rag/message/").status_code == 302
    client.force_login(User.objects.create_user("visitor"))
    assert client.get("/admin/rag/feedback/").status_code == 302


def test_staff_do_not_see_answers_that_quote_a_collection_they_may_not_read(kb):
    secret, members = group_collection()
    secret_doc = Document.objects.create(collection=secret, title="Vault", content="x", content_hash="v")
    public_doc = Document.objects.create(collection=kb, title="Shop", content="y", content_hash="s")

    def turn(title: str, text: str, documents: list[Document]) -> Message:
        conversation = Conversation.objects.create(session_key="s", title=title)
        Message.objects.create(conversation=conversation, role="user", text=title)
        sources = [{"id": i, "n": i + 1, "document_id": d.pk} for i, d in enumerate(documents)]
        answer = Message.objects.create(conversation=conversation, role="assistant", text=text, sources=sources)
        Feedback.objects.create(message=answer, value="up", chunk_ids=[])
        return answer

    restricted = turn("Vault code?", "The code is 1234 [1]", [public_doc, secret_doc])
    open_ = turn("Opening hours?", "Nine o'clock [1]", [public_doc])
    gone = turn("Old question?", "Quoted a deleted document", [public_doc])
    gone.sources[0]["document_id"] = 999_999
    gone.save()

    outsider = staff_client(superuser=False)
    messages = outsider.get("/admin/rag/message/").content.decode()
    assert "Nine o&#x27;clock" in messages and "1234" not in messages and "deleted document" not in messages
    assert outsider.get(f"/admin/rag/message/{restricted.pk}/change/").status_code == 302  # "does not exist"
    conversations = outsider.get("/admin/rag/conversation/").content.decode()
    assert "Opening hours?" in conversations and "Vault code?" not in conversations
    assert outsider.get(f"/admin/rag/conversation/{restricted.conversation_id}/change/").status_code == 302
    feedback = outsider.get("/admin/rag/feedback/").content.decode()
    assert str(open_.feedback) in feedback or f"/{open_.feedback.pk}/" in feedback
    assert f"/admin/rag/feedback/{restricted.feedback.pk}/" not in feedback

    member = staff_client(superuser=False, groups=[members])
    assert "1234" in member.get("/admin/rag/message/").content.decode()
    root = staff_client()
    assert "deleted document" in root.get("/admin/rag/message/").content.decode()


@sync_to_async
def signed_in_cookie(user: User) -> str:
    """A session for ``user``, as logging in makes one: its key, for a cookie."""
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.save()
    return session.session_key


async def test_try_a_query_leaves_the_answers_streaming_meanwhile_alone(live_server_url, fake_llm):
    """Under daphne the admin's sync view ran its search on the server's own event loop, then
    closed that loop's HTTP clients: every answer streaming at that moment broke."""
    await add_corpus()
    admin = await User.objects.acreate(username="admin", is_staff=True, is_superuser=True)
    cookie = await signed_in_cookie(admin)
    fake_llm.tokens = [f"t{i} " for i in range(30)]
    fake_llm.inter_token_ms = 30
    jar = aiohttp.CookieJar(unsafe=True)  # the server is an IP address
    cookies = {settings.SESSION_COOKIE_NAME: cookie}
    async with (
        aiohttp.ClientSession(cookie_jar=jar, cookies=cookies) as http,
        http.get(f"{live_server_url}/rag/stream", params={"question": "pgvector?"}) as stream,
    ):
        parser, events = SSEParser(), []
        async for chunk in stream.content.iter_any():
            events += parser.feed(chunk)
            if sum(e.type == "message" for e in events) >= 3:
                break
        form = await (await http.get(f"{live_server_url}{TRY}")).text()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form).group(1)
        data = {"question": "pgvector?", "k": "2", "csrfmiddlewaretoken": token}
        async with http.post(f"{live_server_url}{TRY}", data=data) as tried:
            assert tried.status == 200 and "pgvector" in await tried.text()
        async for chunk in stream.content.iter_any():
            events += parser.feed(chunk)

    tokens = [e.data for e in events if e.type == "message"]
    assert tokens[-1] == "[DONE]" and "".join(tokens[:-1]) == "".join(fake_llm.tokens)
    assert [e.type for e in events if e.type not in ("message", "sources")] == ["metrics"]  # no error


def test_the_document_list_shows_what_the_uploads_take():
    client = staff_client()
    collection = Collection.objects.create(name="kb")
    ingestion.submit_file(collection=collection, name="a.md", data=b"A" * 2048)
    ingestion.submit_file(collection=collection, name="b.md", data=b"B" * 1024)
    page = client.get(CHANGELIST).content.decode()
    assert "Uploaded files kept in the database: 2, 3.0\xa0KB" in page
    assert "2.0\xa0KB" in page and "1.0\xa0KB" in page  # each document's own


async def test_an_answer_still_being_written_is_hidden_from_staff_who_may_not_read_its_sources(fake_llm, settings):
    """Its sources go on its row as soon as they are known, so the admin's filter applies
    while it streams, not only once it is saved."""
    from django.utils import timezone

    from rag.answers.access import Owner
    from rag.models import Reader
    from rag.services import chat
    from rag.services.documents import aadd_documents

    secret, members = await sync_to_async(group_collection)()
    await aadd_documents(documents=["The vault code is 4711."], collection=secret)
    asker = await User.objects.acreate(username="asker")
    await asker.groups.aadd(members)
    fake_llm.first_token_ms = 30_000  # it is still being written while staff look
    settings.RAG_LLM_TIMEOUT = 60
    answer = await chat.ask(
        owner=Owner(user_id=asker.pk), question="Which code opens the vault?", k=2, collections=Reader.of(asker)
    )
    await asyncio.to_thread(
        wait_until, lambda: Message.objects.get(pk=answer.pk).sources, what="the answer's sources on its row"
    )
    # What the claim renewal writes while it streams: the text so far.
    await Message.objects.filter(pk=answer.pk).aupdate(text="The vault code is", claimed_at=timezone.now())

    def admin_pages(client: Client) -> tuple[str, str]:
        return tuple(client.get(f"/admin/rag/{page}/").content.decode() for page in ("message", "conversation"))

    try:
        assert (await Message.objects.aget(pk=answer.pk)).status == Message.Status.STREAMING
        messages, conversations = await sync_to_async(lambda: admin_pages(staff_client(superuser=False)))()
        member = await sync_to_async(lambda: admin_pages(staff_client(superuser=False, groups=[members])))()
    finally:
        await chat.stop(owner=Owner(user_id=asker.pk), answer_id=answer.pk)
    assert "The vault code is" not in messages and "Which code opens the vault?" not in conversations
    assert "The vault code is" in member[0] and "Which code opens the vault?" in member[1]


@pytest.mark.parametrize(
    ("changelist", "field"),
    [
        ("collection", "visibility__exact"),
        ("document", "status__exact"),
        ("document", "embedding_model"),
        ("message", "role__exact"),
        ("message", "feedback__value"),
        ("feedback", "value__exact"),
    ],
)
def test_a_filter_value_holding_a_nul_is_a_bad_filter_not_a_500(changelist, field):
    """Postgres refuses text holding a NUL: the admin treats it as any other bad filter."""
    client = staff_client()
    client.raise_request_exception = False
    url = reverse(f"admin:rag_{changelist}_changelist")
    response = client.get(url, {field: "\x00"})
    assert response.status_code == 302 and response["Location"] == f"{url}?e=1"
    assert client.get(response["Location"]).status_code == 200


@pytest.mark.parametrize("object_id", ["x", "%00", "1x"])
def test_the_chunks_of_a_document_that_cannot_exist_say_so_as_the_admin_does(object_id):
    """Not a 500: Django's admin, as for any id that is not one, says it does not exist."""
    client = staff_client()
    client.raise_request_exception = False
    response = client.get(f"{CHANGELIST}{object_id}/chunks/", follow=True)
    assert response.status_code == 200
    assert "doesn’t exist" in response.content.decode()
