"""What the tests of the HTTP endpoints (rag.web.api) share: reading a stream as a client
does, the errors they expect, and the corpora and users they set up.

Streaming tests talk to the app under daphne (``live_server_url``) with aiohttp over real HTTP,
the app talks to the fake OpenAI server over real HTTP, and every stream is read back with the
spec-conformant parser in tests.sse. Input validation is checked in-process with AsyncClient.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import aiohttp
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from multidict import CIMultiDictProxy

from rag.models import Message
from tests.conftest import wait_until
from tests.sse import Event, SSEParser
from tests.web.test_sse import as_sse_sees_it

live = pytest.mark.django_db(transaction=True)
STREAM_TIMEOUT = 20  # seconds; a stream that does not end by then is a hang, and fails the test
OPENING = " stream open"
#: How soon the upstream must see a client that left: at once, but a busy 2-core machine may
#: take a few hundred ms to schedule it; the rest of the answer would take a second or more.
PROMPTLY_S = 0.5


@dataclass
class Streamed:
    """A stream as the client saw it: comments and events in arrival order."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    timeline: list[Event | str] = field(default_factory=list)  # str: a comment
    parser: SSEParser = field(default_factory=SSEParser)

    @property
    def events(self) -> list[Event]:
        return [item for item in self.timeline if isinstance(item, Event)]

    def feed(self, chunk: bytes) -> list[Event]:
        """Feed byte by byte, so comments and events keep their exact relative order."""
        new: list[Event] = []
        for i in range(len(chunk)):
            seen = len(self.parser.comments)
            events = self.parser.feed(chunk[i : i + 1])
            self.timeline += self.parser.comments[seen:]
            self.timeline += events
            new += events
        return new


def tokens_text(events: list[Event]) -> list[str]:
    """Data of the unnamed events, which in ``text`` format are the tokens and the end marker."""
    return [e.data for e in events if e.type == "message"]


async def stream(
    http: aiohttp.ClientSession, base: str, params: dict[str, str], headers: dict[str, str] | None = None
) -> Streamed:
    async with http.get(f"{base}/rag/stream", params=params, headers=headers) as resp:
        result = Streamed(status=resp.status, headers=resp.headers, body=b"")
        async for chunk in resp.content.iter_any():
            result.body += chunk
            result.feed(chunk)
    return result


def normalized(tokens: list[str]) -> str:
    return "".join(as_sse_sees_it(t) for t in tokens)


def last_assistant_message() -> Message | None:
    return Message.objects.filter(role=Message.Role.ASSISTANT).order_by("-id").first()


async def wait_for_final_message() -> Message:
    """The assistant message once the server has given it a final status."""

    def final() -> Message | None:
        message = last_assistant_message()
        return message if message is not None and message.status != Message.Status.STREAMING else None

    return await sync_to_async(wait_until)(final, timeout=5.0, what="the answer to be saved")  # type: ignore[return-value]


def assert_only_the_servers_ids(result) -> None:
    """No token injected an ``id:`` or a ``retry:``: the ids are the server's own, one per
    event, <answer's public id>.1, .2, ... to the end marker."""
    assert result.parser.retry is None
    ids = [e.id for e in result.events]
    key = ids[0].split(".")[0]
    assert ids == [f"{key}.{n}" for n in range(1, len(ids) + 1)]
    assert result.parser.last_event_id == ids[-1]


def error_of(response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    payload = json.loads(response.content)
    assert isinstance(payload, dict) and isinstance(payload.get("error"), str), payload
    assert payload["error"].strip()
    return payload["error"]


async def post_query(http: aiohttp.ClientSession, base: str, body: object) -> tuple[int, dict]:
    async with http.post(f"{base}/rag/query", json=body) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        return resp.status, await resp.json()


@sync_to_async
def restricted_setup() -> dict[str, str]:
    """A public and a group-only collection; session cookies for an outsider and a member."""
    from django.contrib.auth.models import Group, User
    from django.test import Client

    from rag.models import Collection

    members = Group.objects.create(name="members")
    Collection.objects.create(name="public")
    secret = Collection.objects.create(name="secret", visibility=Collection.Visibility.GROUPS)
    secret.groups.add(members)
    Collection.objects.create(name="staffonly", visibility=Collection.Visibility.STAFF)
    cookies = {}
    for name, groups, staff in [("outsider", [], False), ("member", [members], False), ("staffer", [], True)]:
        user = User.objects.create_user(username=name, password="pw", is_staff=staff)
        user.groups.set(groups)
        client = Client()
        client.force_login(user)
        cookies[name] = client.cookies[settings.SESSION_COOKIE_NAME].value
    return cookies


async def add_to(collection: str, text: str) -> None:
    from rag.models import Collection
    from rag.services.documents import DocumentInput, aadd_documents

    await aadd_documents(
        documents=[DocumentInput(text=text)], collection=await Collection.objects.aget(name=collection)
    )


def cookie(session: str | None) -> dict[str, str]:
    return {"Cookie": f"{settings.SESSION_COOKIE_NAME}={session}"} if session else {}


async def read_tokens_then_leave(http, base: str, params: dict[str, str], *, tokens: int) -> list[Event]:
    """Read a /rag/stream until ``tokens`` tokens came, then drop the connection."""
    parser, events = SSEParser(), []
    async with http.get(f"{base}/rag/stream", params=params) as resp:
        async for chunk in resp.content.iter_any():
            events += parser.feed(chunk)
            if len([e for e in events if e.type == "message"]) >= tokens:
                return events
    raise AssertionError(f"the stream ended before {tokens} tokens: {events}")


def json_tokens(events: list[Event]) -> list[str]:
    return [json.loads(e.data)["token"] for e in events if e.type == "message"]


async def add_with_metadata(text: str, metadata: dict) -> None:
    from rag.services.documents import DocumentInput, aadd_documents

    await aadd_documents(documents=[DocumentInput(text=text, metadata=metadata)])
