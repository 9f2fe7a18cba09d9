"""Who is asking, for every transport: the API views, the chat page, the WebSocket.

- ``asking_user``: the user of an HTTP request (anonymous included), for /rag/*.
- ``request_owner`` / ``scope_owner``: who owns the conversations a chat visitor sees:
  a signed-in user, else an anonymous visitor's owner key.

Every conversation and answer lookup of the chat service is filtered by an ``Owner``, so
someone else's conversation or answer is indistinguishable from a missing one.

An anonymous visitor's owner key is a random token in a cookie of its own (``rag_owner``),
set by the response to their first question. Like a session id, whoever holds it owns what
was asked under it; unlike a database session, reading it costs no query. With the key kept
in the session, every first question saved a session and every answer's stream read one:
3–6 ms of the server's CPU per question (of 17–24) with 100 visitors asking at once
(docs/benchmarks.md).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.sessions.backends.base import SessionBase
from django.db.models import Q
from django.http import HttpRequest, HttpResponse
from django.http.request import split_domain_port, validate_host

from rag.services.connections import arelease_connection

OWNER_COOKIE = "rag_owner"
#: Where owner keys were kept before they had a cookie: sessions from then still own their
#: conversations (and a session older still files them under its own key).
SESSION_OWNER_KEY = "rag_owner"
_OWNER_KEY = re.compile(r"[A-Za-z0-9_-]{16,64}")


@dataclass(frozen=True, slots=True)
class Owner:
    """Who a conversation belongs to: a signed-in user, else an anonymous visitor's key."""

    user_id: int | None
    session_key: str = ""

    def conversations(self) -> Q:
        if self.user_id is not None:
            return Q(user_id=self.user_id)
        if not self.session_key:
            return Q(pk__in=[])  # an anonymous visitor who never asked owns nothing
        return Q(user__isnull=True, session_key=self.session_key)

    def messages(self) -> Q:
        if self.user_id is not None:
            return Q(conversation__user_id=self.user_id)
        if not self.session_key:
            return Q(pk__in=[])
        return Q(conversation__user__isnull=True, conversation__session_key=self.session_key)


async def owner_for(
    *, user: Any, cookies: Mapping[str, str], session: SessionBase | None = None, create: bool = False
) -> Owner:
    """A signed-in user, else the anonymous visitor's key from ``cookies`` (or, for a visitor
    from before the cookie, from ``session``). ``create`` gives a new key to a visitor about
    to ask something: the transport then hands it back (``remember_owner``)."""
    if user is not None and user.is_authenticated:
        return Owner(user_id=user.pk)
    key = _cookie_owner_key(cookies) or await _session_owner_key(session)
    if not key and create:
        key = secrets.token_urlsafe(24)
    return Owner(user_id=None, session_key=key)


def _cookie_owner_key(cookies: Mapping[str, str]) -> str:
    key = cookies.get(OWNER_COOKIE, "")
    return key if _OWNER_KEY.fullmatch(key) else ""


async def _session_owner_key(session: SessionBase | None) -> str:
    if session is None or session.session_key is None:
        return ""  # no session cookie: nothing to read, and no query
    return await session.aget(SESSION_OWNER_KEY) or session.session_key or ""


def _session_owner_key_sync(session: SessionBase | None) -> str:
    """``_session_owner_key`` for login (``adopt_on_login``), which runs sync."""
    if session is None or session.session_key is None:
        return ""
    return session.get(SESSION_OWNER_KEY) or session.session_key or ""


async def request_owner(request: HttpRequest, *, create: bool = False) -> Owner:
    """The owner of what a chat page request may see.

    Looking them up used a database connection only if the request carried a session cookie
    (a signed-in user, or a visitor from before the owner cookie); that one goes back to the
    pool, as what follows may be a long stream."""
    owner = await owner_for(user=await request.auser(), cookies=request.COOKIES, session=request.session, create=create)
    if settings.SESSION_COOKIE_NAME in request.COOKIES:
        await arelease_connection()
    return owner


def remember_owner(response: HttpResponse, owner: Owner) -> None:
    """Keep an anonymous owner's key in its cookie for as long as a session would last,
    counted from its latest question."""
    if owner.user_id is not None or not owner.session_key:
        return
    response.set_cookie(
        OWNER_COOKIE,
        owner.session_key,
        max_age=settings.SESSION_COOKIE_AGE,
        path=settings.SESSION_COOKIE_PATH,
        domain=settings.SESSION_COOKIE_DOMAIN,
        secure=settings.SESSION_COOKIE_SECURE,
        httponly=True,
        samesite=settings.SESSION_COOKIE_SAMESITE,
    )


async def scope_owner(scope: dict) -> Owner:
    """The owner of what a WebSocket asks (it always may ask, so it always gets one: a
    socket without a key gets one of its own, whose conversations no page lists)."""
    return await owner_for(
        user=scope.get("user"), cookies=scope.get("cookies") or {}, session=scope.get("session"), create=True
    )


def adopt_on_login(sender: Any, *, request: Any, user: Any, **kwargs: Any) -> None:
    """``user_logged_in``: the conversations asked anonymously in this browser become the user's."""
    key = _cookie_owner_key(getattr(request, "COOKIES", {})) or _session_owner_key_sync(
        getattr(request, "session", None)
    )
    if key:
        from rag.services.chat import adopt_anonymous  # chat files conversations under these keys

        adopt_anonymous(session_key=key, user_id=user.pk)


class CrossSite(PermissionError):
    """A signed-in user's browser sent this from another site: a link or a page there, not
    the user, is asking in their name."""

    message = (
        "This request came from another site, so it may not act as your signed-in account: "
        "ask from this site's own pages, or from a program (which sends no cookie)."
    )


def same_origin(request: HttpRequest) -> bool:
    """Whether a browser sent ``request`` from this site's own pages (or the user typed the
    URL). Browsers say so in Sec-Fetch-Site; older ones send Origin on cross-site requests;
    a program sends neither, and no cookie to abuse either."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    return origin is None or own_origin(origin, host=request.get_host(), secure=request.is_secure())


def own_origin(origin: str, *, host: str, secure: bool) -> bool:
    """Whether ``origin`` (a browser's Origin header) is this site as reached at ``host``
    (the request's Host, port included), over https when the request itself is."""
    parsed = urlsplit(origin)
    return (
        parsed.scheme in (("https",) if secure else ("http", "https"))
        and parsed.netloc.lower() == host.lower()
        and validate_host(split_domain_port(parsed.netloc)[0], settings.ALLOWED_HOSTS)
    )


async def asking_user(request: HttpRequest) -> Any:
    """The user asking the API. A signed-in user's request from another site raises
    ``CrossSite``: a link elsewhere must not plant questions in someone's history.

    Looking the user up used a database connection only if the request carried a session
    cookie; that one goes back to the pool, as the answer may take a while."""
    user = await request.auser()
    if settings.SESSION_COOKIE_NAME in request.COOKIES:
        await arelease_connection()
    if user.is_authenticated and not same_origin(request):
        raise CrossSite(CrossSite.message)
    return user
